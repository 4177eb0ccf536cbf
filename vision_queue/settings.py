"""One settings object for both sides, read from the environment and validated at start.

Every field names its environment variable, its default and its meaning next to it;
`settings_table()` renders them as the Markdown table in docs/settings.md (a test keeps
the two in step). Secrets (passwords inside Redis URLs) are masked whenever a settings
object is printed or logged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

from vision_queue.protocol import TaskName
from vision_queue.redis_urls import mask_url, normalize_redis_url
from vision_queue.setting_checks import settings_problems
from vision_queue.setting_values import (
    DEFAULT_TOKEN_CAPS,
    allowlist,
    key_digest,
    parse_bool,
    parse_caps,
    split_list,
)


class SettingsError(ValueError):
    """The environment holds an invalid setting. The message names every bad variable."""


def _setting(env: str, default: Any, doc: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"env": env, "doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    # Connections
    redis_url: str = _setting(
        "REDIS_URL",
        "redis://localhost:6379/0",
        "Redis for both broker and result backend (redis://, rediss://, with password), or "
        "its sentinels: `sentinel://[:password@]host:port;sentinel://host:port;...` "
        "(the Redis password in the first URL) with VQ_REDIS_SENTINEL_MASTER.",
        secret=True,
    )
    broker_url: str = _setting(
        "VQ_BROKER_URL", "", "Broker URL when it differs from REDIS_URL.", secret=True
    )
    result_backend_url: str = _setting(
        "VQ_RESULT_BACKEND_URL",
        "",
        "Result backend URL when it differs from REDIS_URL.",
        secret=True,
    )
    redis_sentinel_master: str = _setting(
        "VQ_REDIS_SENTINEL_MASTER",
        "",
        "Name of the master the sentinels watch (`sentinel monitor <name> ...`); required "
        "when a Redis URL is sentinel://. Every connection follows a failover by itself.",
    )
    redis_sentinel_password: str = _setting(
        "VQ_REDIS_SENTINEL_PASSWORD",
        "",
        "Password of the sentinels themselves (their requirepass), if they have one.",
        secret=True,
    )
    queue: str = _setting(
        "VQ_QUEUE",
        "gpu",
        "Queue the tasks are routed to and workers consume: one Redis list per priority, "
        "VQ_QUEUE.high, VQ_QUEUE (normal) and VQ_QUEUE.low.",
    )
    connect_timeout_s: float = _setting(
        "VQ_CONNECT_TIMEOUT_S",
        5.0,
        "How long a producer keeps retrying an unreachable Redis before giving up.",
    )
    # Delivery and retries
    task_time_limit_s: int = _setting(
        "VQ_TASK_TIME_LIMIT_S",
        600,
        "Longest a task may run on a worker before it fails with timeout.",
    )
    visibility_timeout_s: int = _setting(
        "VQ_VISIBILITY_TIMEOUT_S",
        3600,
        "Seconds before a message taken by a worker that died is delivered again. "
        "Must exceed VQ_TASK_TIME_LIMIT_S, which also bounds a task's wait for a free "
        "batch row (its deadline starts when a worker slot takes the message).",
    )
    restore_interval_s: int = _setting(
        "VQ_RESTORE_INTERVAL_S",
        10,
        "How often workers look for messages whose worker died (past the visibility timeout).",
    )
    result_expires_s: int = _setting(
        "VQ_RESULT_EXPIRES_S", 86400, "How long results (and staged images) are kept in Redis."
    )
    max_retries: int = _setting(
        "VQ_MAX_RETRIES", 3, "Retries of a transient failure (fetch 5xx, connection error)."
    )
    retry_backoff_s: float = _setting(
        "VQ_RETRY_BACKOFF_S", 2.0, "First retry delay; doubles each retry."
    )
    retry_backoff_max_s: float = _setting("VQ_RETRY_BACKOFF_MAX_S", 60.0, "Longest retry delay.")
    lease_ttl_s: float = _setting(
        "VQ_LEASE_TTL_S",
        10.0,
        "A worker's lease on each message it runs, renewed every heartbeat; once it lapses "
        "(the worker died or froze) a live worker hands the message back to the queue.",
    )
    max_deliveries: int = _setting(
        "VQ_MAX_DELIVERIES",
        3,
        "Deliveries of one message (a worker died each time) before the task fails for good.",
    )
    priority_max_skips: int = _setting(
        "VQ_PRIORITY_MAX_SKIPS",
        10,
        "Tasks a worker takes in a row from higher-priority lists while a lower one waits; "
        "its next task then comes from the waiting list, so low tasks are never starved.",
    )
    # Input limits
    max_image_bytes: int = _setting("VQ_MAX_IMAGE_BYTES", 20 * 1024 * 1024, "Largest image file.")
    max_image_pixels: int = _setting(
        "VQ_MAX_IMAGE_PIXELS", 40_000_000, "Largest width x height, checked before decoding pixels."
    )
    max_images: int = _setting("VQ_MAX_IMAGES", 8, "Most images in one request.")
    max_prompt_chars: int = _setting("VQ_MAX_PROMPT_CHARS", 4000, "Longest prompt.")
    max_conversation_chars: int = _setting(
        "VQ_MAX_CONVERSATION_CHARS",
        32000,
        "Most characters in all the messages of one conversation (ask with messages).",
    )
    max_new_tokens_caps: str = _setting(
        "VQ_MAX_NEW_TOKENS_CAPS",
        DEFAULT_TOKEN_CAPS,
        "Per-task cap on max_new_tokens (also the default), as task=N pairs.",
    )
    default_num_crops: int = _setting(
        "VQ_NUM_CROPS", 0, "HD crops per image; 0 uses the checkpoint's preprocessor_config.json."
    )
    # Fetching images
    fetch_timeout_s: float = _setting(
        "VQ_FETCH_TIMEOUT_S", 20.0, "Total deadline for fetching one image URL, redirects included."
    )
    fetch_max_redirects: int = _setting("VQ_FETCH_MAX_REDIRECTS", 3, "Redirects followed per URL.")
    allowed_private_hosts: str = _setting(
        "VQ_ALLOWED_PRIVATE_HOSTS",
        "",
        "Comma-separated `host:port` entries a worker may fetch from even though they resolve "
        "to private addresses (private deployments only); a bare `host` allows ports 80 and "
        "443 only.",
    )
    local_image_roots: str = _setting(
        "VQ_LOCAL_IMAGE_ROOTS",
        "",
        "Comma-separated folders a worker may read `path` images from; empty disables paths.",
    )
    # Worker
    model: str = _setting(
        "VQ_MODEL", "microsoft/Phi-3-vision-128k-instruct", "Local folder or Hugging Face id."
    )
    device: str = _setting("VQ_DEVICE", "auto", "cuda:N, cpu, or auto (first GPU, else CPU).")
    dtype: str = _setting("VQ_DTYPE", "auto", "bfloat16, float16, float32, or auto.")
    attention: str = _setting("VQ_ATTENTION", "auto", "sdpa, flash_attention_2, eager, or auto.")
    max_batch: int = _setting(
        "VQ_MAX_BATCH",
        0,
        "Requests a worker runs at once (its slots, decoded together in one batch); "
        "0 = 1 on CPU, 16 on CUDA (see docs/benchmarks.md).",
    )
    kv_cache_positions: int = _setting(
        "VQ_KV_CACHE_POSITIONS",
        0,
        "KV cache positions the worker preallocates for all its requests together; "
        "0 = what free device memory allows (CUDA) or a quarter of free RAM (CPU).",
    )
    prefill_chunk_tokens: int = _setting(
        "VQ_PREFILL_CHUNK_TOKENS",
        0,
        "Prompt positions prefilled per step while other requests decode; 0 = 1024 on "
        "CUDA, whole prompts on CPU.",
    )
    worker_name: str = _setting(
        "VQ_WORKER_NAME",
        "",
        "Worker node name; default gpu-<device>@host, gpu-<device>-2@host for a second "
        "worker on that device and host. Two running workers on one host never share one.",
    )
    metrics_port: int = _setting("VQ_METRICS_PORT", 0, "Prometheus metrics port; 0 turns it off.")
    metrics_address: str = _setting(
        "VQ_METRICS_ADDRESS",
        "127.0.0.1",
        "Address the metrics server binds to; 0.0.0.0 (or ::) for a Prometheus on another host.",
    )
    health_file: str = _setting(
        "VQ_HEALTH_FILE",
        "",
        "Heartbeat file for the health commands; default in the temp dir, named after the "
        "worker (`worker health` without a name finds the running ones there).",
    )
    heartbeat_interval_s: float = _setting(
        "VQ_HEARTBEAT_INTERVAL_S", 2.0, "How often the worker refreshes its health file."
    )
    stuck_task_grace_s: float = _setting(
        "VQ_STUCK_TASK_GRACE_S",
        120.0,
        "A task busy longer than VQ_TASK_TIME_LIMIT_S plus this is stuck: readiness fails; "
        "after as long again the worker hands the message back and exits (code 4).",
    )
    log_level: str = _setting("VQ_LOG_LEVEL", "INFO", "Log level of both sides.")
    remote_control: str = _setting(
        "VQ_REMOTE_CONTROL",
        "restricted",
        "Celery remote-control commands a worker answers: `restricted` (inspection, cancel "
        "and Flower's event switch; shutdown, pool and consumer changes are refused) or "
        "`full` (every Celery command, Flower's buttons included). docs/security.md.",
    )
    # Webhooks (sent by workers)
    webhook_secret: str = _setting(
        "VQ_WEBHOOK_SECRET",
        "",
        "HMAC-SHA256 key that signs webhook bodies; empty: callback_url is refused.",
        secret=True,
    )
    webhook_max_attempts: int = _setting(
        "VQ_WEBHOOK_MAX_ATTEMPTS", 5, "Deliveries tried per webhook before it is dropped."
    )
    webhook_backoff_s: float = _setting(
        "VQ_WEBHOOK_BACKOFF_S", 1.0, "Delay before the second webhook attempt; doubles each time."
    )
    webhook_timeout_s: float = _setting(
        "VQ_WEBHOOK_TIMEOUT_S", 10.0, "Deadline of one webhook attempt (connect, send, answer)."
    )
    webhook_allowed_private_hosts: str = _setting(
        "VQ_WEBHOOK_ALLOWED_PRIVATE_HOSTS",
        "",
        "Comma-separated callback hosts allowed although they resolve to private addresses: "
        "host:port, or a bare host for ports 80 and 443 only.",
    )
    # HTTP gateway (`producer serve`)
    api_keys: str = _setting(
        "VQ_API_KEYS",
        "",
        "Comma-separated gateway API keys (at least 20 characters each), or their SHA-256 "
        "as sha256:<hex>. Only hashes are kept in memory.",
        secret=True,
    )
    gateway_allow_anonymous: bool = _setting(
        "VQ_GATEWAY_ALLOW_ANONYMOUS",
        False,
        "Serve without API keys (all callers share one limit). Off: no keys, no start.",
    )
    gateway_model_name: str = _setting(
        "VQ_GATEWAY_MODEL_NAME",
        "phi-3-vision-128k-instruct",
        "Model id the OpenAI API lists and answers with.",
    )
    gateway_max_body_bytes: int = _setting(
        "VQ_GATEWAY_MAX_BODY_BYTES", 64 * 1024 * 1024, "Largest request body the gateway reads."
    )
    gateway_cors_origins: str = _setting(
        "VQ_GATEWAY_CORS_ORIGINS",
        "",
        "Comma-separated origins browsers may call the gateway from; empty: CORS off.",
    )
    gateway_requests_per_minute: int = _setting(
        "VQ_GATEWAY_REQUESTS_PER_MINUTE", 600, "Requests per API key per minute; 0: no limit."
    )
    gateway_request_burst: int = _setting(
        "VQ_GATEWAY_REQUEST_BURST", 60, "Requests an API key may send at once above the rate."
    )
    gateway_max_tasks_per_key: int = _setting(
        "VQ_GATEWAY_MAX_TASKS_PER_KEY",
        32,
        "Unfinished tasks (queued or running) per API key; 0: no limit.",
    )
    gateway_wait_timeout_s: float = _setting(
        "VQ_GATEWAY_WAIT_TIMEOUT_S",
        900.0,
        "Longest a chat completion waits for its task before answering 504 (and cancelling).",
    )

    # Derived values -----------------------------------------------------------------

    @property
    def effective_broker_url(self) -> str:
        return normalize_redis_url(self.broker_url or self.redis_url)

    @property
    def effective_backend_url(self) -> str:
        return normalize_redis_url(self.result_backend_url or self.redis_url)

    @cached_property
    def token_caps(self) -> dict[TaskName, int]:
        # Cached: every request is checked against it, and submit_many checks thousands.
        return parse_caps(self.max_new_tokens_caps)

    @property
    def private_host_allowlist(self) -> frozenset[str]:
        """Canonical `host:port` and bare `host` entries (`addresses.allowlist_entry`)."""
        return allowlist(self.allowed_private_hosts)

    @property
    def image_roots(self) -> tuple[str, ...]:
        return tuple(split_list(self.local_image_roots))

    @property
    def webhook_host_allowlist(self) -> frozenset[str]:
        """The same form as `private_host_allowlist`, for webhook receivers."""
        return allowlist(self.webhook_allowed_private_hosts)

    @property
    def cors_origins(self) -> tuple[str, ...]:
        return tuple(split_list(self.gateway_cors_origins))

    @property
    def api_key_digests(self) -> frozenset[str]:
        """SHA-256 (hex) of every configured API key; the keys themselves are not kept."""
        return frozenset(key_digest(entry) for entry in split_list(self.api_keys))

    # Construction -------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every variable, convert and validate; raise one SettingsError naming all faults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        problems: list[str] = []
        for f in fields(cls):
            if f.name in overrides:
                values[f.name] = overrides[f.name]
                continue
            raw = env.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _CONVERTERS[type(f.default)](raw)
            except ValueError:
                problems.append(
                    f"{f.metadata['env']}={raw!r} is not a valid {type(f.default).__name__}"
                )
        if problems:
            raise SettingsError("; ".join(problems))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        problems = settings_problems(self)
        if problems:
            raise SettingsError("; ".join(problems))

    def masked(self) -> dict[str, Any]:
        """Every setting by environment name, secrets masked: safe to log."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and isinstance(value, str):
                # URLs keep their host (useful in logs); other secrets show nothing at all.
                value = mask_url(value) if "://" in value else ("****" if value else "")
            out[f.metadata["env"]] = value
        return out

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.masked().items())
        return f"Settings({inner})"

    __str__ = __repr__


_CONVERTERS: dict[type, Callable[[str], Any]] = {
    str: str,
    int: lambda raw: int(raw.strip()),
    float: lambda raw: float(raw.strip()),
    bool: parse_bool,
}


def settings_table() -> str:
    """The Markdown table of every environment variable, its default and meaning."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for f in fields(Settings):
        default = f.default if f.default != "" else "(empty)"
        lines.append(f"| `{f.metadata['env']}` | `{default}` | {f.metadata['doc']} |")
    return "\n".join(lines) + "\n"
