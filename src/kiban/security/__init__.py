"""Declarative security: schemes, and requirements at API, router and route level."""

from kiban.security.policy import (
    NoSecurity,
    Policy,
    RateLimited,
    Requirement,
    Security,
    SecurityConfigError,
    Unlimited,
    owns,
    principal,
)
from kiban.security.schemes import (
    JWT,
    APIKey,
    AuthError,
    BasicAuth,
    InternalIDToken,
    OAuth2,
    Principal,
    Scheme,
)
from kiban.security.tokens import JWKS, InvalidToken, TokenVerifier

__all__ = [
    "JWKS",
    "JWT",
    "APIKey",
    "AuthError",
    "BasicAuth",
    "InternalIDToken",
    "InvalidToken",
    "NoSecurity",
    "OAuth2",
    "Policy",
    "Principal",
    "RateLimited",
    "Requirement",
    "Scheme",
    "Security",
    "SecurityConfigError",
    "TokenVerifier",
    "Unlimited",
    "owns",
    "principal",
]
