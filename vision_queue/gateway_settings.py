"""The settings only the HTTP gateway (`producer serve`) reads: keys, limits, the edge.

`vision_queue.settings.Settings` inherits them, so every process has one settings object;
they live apart because they are the gateway's concern alone (a worker or a web backend's
client never reads them, and does not validate them).
"""

from __future__ import annotations

from dataclasses import dataclass

from vision_queue.setting_fields import GATEWAY_ONLY, setting
from vision_queue.setting_values import key_digest, split_list


@dataclass(frozen=True)
class GatewaySettings:
    api_keys: str = setting(
        "VQ_API_KEYS",
        "",
        "Comma-separated gateway API keys (at least 20 characters each), or their SHA-256 "
        "as sha256:<hex>. Only hashes are kept in memory.",
        GATEWAY_ONLY,
        same=True,
        secret=True,
    )
    gateway_allow_anonymous: bool = setting(
        "VQ_GATEWAY_ALLOW_ANONYMOUS",
        False,
        "Serve without API keys (all callers share one limit). Off: no keys, no start.",
        GATEWAY_ONLY,
    )
    gateway_model_name: str = setting(
        "VQ_GATEWAY_MODEL_NAME",
        "phi-3-vision-128k-instruct",
        "Model id the OpenAI API lists and answers with.",
        GATEWAY_ONLY,
    )
    gateway_max_body_bytes: int = setting(
        "VQ_GATEWAY_MAX_BODY_BYTES",
        64 * 1024 * 1024,
        "Largest request body the gateway reads.",
        GATEWAY_ONLY,
    )
    gateway_cors_origins: str = setting(
        "VQ_GATEWAY_CORS_ORIGINS",
        "",
        "Comma-separated origins browsers may call the gateway from; empty: CORS off.",
        GATEWAY_ONLY,
    )
    gateway_requests_per_minute: int = setting(
        "VQ_GATEWAY_REQUESTS_PER_MINUTE",
        600,
        "Requests per API key per minute; 0: no limit.",
        GATEWAY_ONLY,
    )
    gateway_request_burst: int = setting(
        "VQ_GATEWAY_REQUEST_BURST",
        60,
        "Requests an API key may send at once above the rate.",
        GATEWAY_ONLY,
    )
    gateway_max_tasks_per_key: int = setting(
        "VQ_GATEWAY_MAX_TASKS_PER_KEY",
        32,
        "Unfinished tasks (queued or running) per API key; 0: no limit.",
        GATEWAY_ONLY,
    )
    gateway_wait_timeout_s: float = setting(
        "VQ_GATEWAY_WAIT_TIMEOUT_S",
        900.0,
        "Longest a chat completion waits for its task before answering 504 (and cancelling).",
        GATEWAY_ONLY,
    )

    gateway_auth_failures_per_minute: int = setting(
        "VQ_GATEWAY_AUTH_FAILURES_PER_MINUTE",
        30,
        "Failed API key attempts per client address and minute (per process), then 429.",
        GATEWAY_ONLY,
    )
    gateway_max_connections: int = setting(
        "VQ_GATEWAY_MAX_CONNECTIONS",
        1000,
        "Open connections per gateway process; past it the longest-idle one is closed.",
        GATEWAY_ONLY,
    )
    gateway_redis_connections: int = setting(
        "VQ_GATEWAY_REDIS_CONNECTIONS",
        64,
        "Redis connections per pool of a gateway process; a burst waits for one, then 429.",
        GATEWAY_ONLY,
    )
    gateway_header_timeout_s: float = setting(
        "VQ_GATEWAY_HEADER_TIMEOUT_S",
        10.0,
        "Longest a request line and headers may take to arrive (idle connections included).",
        GATEWAY_ONLY,
    )
    gateway_body_timeout_s: float = setting(
        "VQ_GATEWAY_BODY_TIMEOUT_S",
        60.0,
        "Longest a request body may take to arrive after its headers.",
        GATEWAY_ONLY,
    )

    @property
    def cors_origins(self) -> tuple[str, ...]:
        return tuple(split_list(self.gateway_cors_origins))

    @property
    def api_key_digests(self) -> frozenset[str]:  # SHA-256 (hex) of each key, not the keys
        return frozenset(key_digest(entry) for entry in split_list(self.api_keys))
