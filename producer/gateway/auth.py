"""API keys: callers send `Authorization: Bearer <key>` (what OpenAI SDKs send) or `X-API-Key`.

Only the SHA-256 of each configured key is held (`Settings.api_key_digests`). A presented
key is hashed and compared with every stored digest in constant time, without stopping at
a match, so neither the comparison nor the number of keys leaks through timing. A caller is
known by `key_id`, the first 12 hex digits of its key's digest: the only form that reaches
limits, metrics and logs.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request
from starlette.datastructures import Headers

from producer.gateway.errors import ApiError, GatewayCode

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Caller:
    key_id: str


class KeyRing:
    def __init__(self, digests: frozenset[str], *, allow_anonymous: bool = False) -> None:
        self._digests = tuple(sorted(bytes.fromhex(d) for d in digests))
        self.allow_anonymous = allow_anonymous and not self._digests

    def identify(self, key: str | None) -> Caller | None:
        """The caller a key belongs to, or None for a missing or unknown key."""
        if self.allow_anonymous:
            return Caller(ANONYMOUS)
        if not key:
            return None
        presented = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        matched = b""
        for digest in self._digests:
            if hmac.compare_digest(presented, digest):
                matched = digest
        return Caller(matched.hex()[:12]) if matched else None

    def authenticate(self, request: Request) -> Caller:
        caller = self.identify(presented_key(request.headers))
        if caller is None:
            raise ApiError(
                401,
                GatewayCode.INVALID_API_KEY.value,
                "missing or invalid API key (send Authorization: Bearer <key>)",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return caller


def presented_key(headers: Headers) -> str | None:
    """The key a caller sent in its headers (never the query string), or None."""
    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key") or None
