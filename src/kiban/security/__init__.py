"""Declarative security: schemes, and requirements at API, router and route level."""

from kiban.security._declare import (
    NoSecurity,
    RateLimited,
    Requirement,
    Security,
    SecurityConfigError,
    Unlimited,
)
from kiban.security._identity import owns, principal
from kiban.security._policy import Policy
from kiban.security._schemes import (
    JWT,
    APIKey,
    AuthError,
    BasicAuth,
    InternalIDToken,
    Introspection,
    OAuth2,
    Principal,
    Scheme,
)
from kiban.security._tokens import JWKS, InvalidToken, TokenVerifier, mint

__all__ = [
    "JWKS",
    "JWT",
    "APIKey",
    "AuthError",
    "BasicAuth",
    "InternalIDToken",
    "Introspection",
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
    "mint",
    "owns",
    "principal",
]
