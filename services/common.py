"""What the sample services share: their settings base and their security schemes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, StringConstraints

import kiban
from kiban.security import JWT, APIKey, InternalIDToken, Principal

DEV_KEYS = Path(__file__).resolve().parent / "devkeys"


#: A short text with at least one visible character, stored as given: the schema
#: states every rule, so what it allows is accepted and nothing else.
Label = Annotated[
    str, StringConstraints(min_length=1, max_length=100, pattern=r"[^\u0000-\u0020\u007f]")
]


class SampleSettings(kiban.Settings):
    """Keys default to the committed development keys (services/devkeys)."""

    #: Public key of the authorization server that signs user and admin JWTs.
    auth_public_key_file: Path = DEV_KEYS / "auth-dev.pub.pem"
    auth_issuer: str = "kiban-dev-auth"
    #: Public key of the API gateway that signs internal identity tokens.
    gateway_public_key_file: Path = DEV_KEYS / "gateway-dev.pub.pem"
    gateway_issuer: str = "kiban-dev-gateway"
    #: API clients and their keys, e.g. ``API_KEYS='{"partner": "..."}'``.
    api_keys: dict[str, SecretStr] = Field(
        default_factory=lambda: {"dev-partner": SecretStr("dev-partner-key")}
    )
    #: Requests per second per token subject (or user IP on public routes).
    rate_limit: str = "50/second"


class Schemes:
    """The schemes of one service, built from its settings."""

    def __init__(self, settings: SampleSettings) -> None:
        self.jwt = JWT(
            algorithms=["EdDSA"],
            key=settings.auth_public_key_file.read_bytes(),
            issuer=settings.auth_issuer,
        )
        self.internal = InternalIDToken(
            algorithms=["EdDSA"],
            key=settings.gateway_public_key_file.read_bytes(),
            issuer=settings.gateway_issuer,
            header=settings.headers.id_token,
        )
        keys = {secret.get_secret_value(): client for client, secret in settings.api_keys.items()}

        async def validate(key: str) -> Principal | None:
            client = keys.get(key)
            return Principal("api_key", client) if client else None

        self.api_key = APIKey(validate)
