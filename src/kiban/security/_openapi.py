"""The resolved requirements written into the OpenAPI document.

What a client generator and a reader of the docs see is what is enforced: each
operation's ``security``, the schemes, and the 401/403/429 problems it can answer.
"""

from __future__ import annotations

from typing import Any

from kiban.security._routing import Resolved

__all__ = ["document"]


def document(
    openapi: dict[str, Any], operations: dict[tuple[str, str], Resolved]
) -> dict[str, Any]:
    """Write the resolved requirements into an OpenAPI document, in place."""
    schemes: dict[str, Any] = {}
    for (path, method), resolved in operations.items():
        operation = openapi.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        requirement = resolved.requirement
        operation["security"] = [
            {a.scheme.name: sorted(a.scopes)} for a in requirement.alternatives
        ]
        for alternative in requirement.alternatives:
            schemes[alternative.scheme.name] = alternative.scheme.openapi()
        if not requirement.public:
            responses = operation.setdefault("responses", {})
            for status, description in (("401", "Unauthorized"), ("403", "Forbidden")):
                responses.setdefault(
                    status,
                    {
                        "description": description,
                        "content": {
                            "application/problem+json": {
                                "schema": {"$ref": "#/components/schemas/Problem"}
                            }
                        },
                    },
                )
        if resolved.rate_limit is not None:
            operation.setdefault("responses", {}).setdefault(
                "429",
                {
                    "description": "Too Many Requests",
                    "content": {
                        "application/problem+json": {
                            "schema": {"$ref": "#/components/schemas/Problem"}
                        }
                    },
                },
            )
    if schemes:
        openapi.setdefault("components", {})["securitySchemes"] = schemes
    return openapi
