"""One settings object for both sides, read from the environment and validated at start.

Next to every field: its environment variable, default, meaning, the processes that read
it and whether every host must agree on it (`vision_queue.setting_fields`), rendered by
`settings_table()` into docs/settings.md and by `worker settings`. A process validates what
it reads (`from_env(reader=...)`). Secrets are masked whenever settings are printed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

from vision_queue.gateway_settings import GatewaySettings
from vision_queue.protocol import TaskName
from vision_queue.redis_urls import normalize_redis_url
from vision_queue.setting_checks import settings_problems
from vision_queue.setting_fields import (
    ALL,
    SERVERS,
    WORKER_ONLY,
    Reader,
    markdown_table,
    masked_values,
    reads,
    setting,
    values_from_env,
)
from vision_queue.setting_values import (
    DEFAULT_TOKEN_CAPS,
    allowlist,
    parse_caps,
    split_list,
)


class SettingsError(ValueError):
    """The environment holds an invalid setting. The message names every bad variable."""


@dataclass(frozen=True)
class Settings(GatewaySettings):
    """Every setting; the gateway's own are declared in `GatewaySettings`."""

    # Connections
    redis_url: str = setting(
        "REDIS_URL",
        "redis://localhost:6379/0",
        "Redis for both broker and result backend (redis://, rediss://, with password), or "
        "its sentinels: `sentinel://[:password@]host:port;sentinel://host:port;...` "
        "(the Redis password in the first URL) with VQ_REDIS_SENTINEL_MASTER.",
        ALL,
        same=True,
        secret=True,
    )
    broker_url: str = setting(
        "VQ_BROKER_URL",
        "",
        "Broker URL when it differs from REDIS_URL.",
        ALL,
        same=True,
        secret=True,
    )
    result_backend_url: str = setting(
        "VQ_RESULT_BACKEND_URL",
        "",
        "Result backend URL when it differs from REDIS_URL.",
        ALL,
        same=True,
        secret=True,
    )
    redis_sentinel_master: str = setting(
        "VQ_REDIS_SENTINEL_MASTER",
        "",
        "Name of the master the sentinels watch (`sentinel monitor <name> ...`); required "
        "when a Redis URL is sentinel://. Every connection follows a failover by itself.",
        ALL,
        same=True,
    )
    redis_sentinel_password: str = setting(
        "VQ_REDIS_SENTINEL_PASSWORD",
        "",
        "Password of the sentinels themselves (their requirepass), if they have one.",
        ALL,
        same=True,
        secret=True,
    )
    queue: str = setting(
        "VQ_QUEUE",
        "gpu",
        "Queue the tasks are routed to and workers consume: one Redis list per priority, "
        "VQ_QUEUE.high, VQ_QUEUE (normal) and VQ_QUEUE.low.",
        ALL,
        same=True,
    )
    connect_timeout_s: float = setting(
        "VQ_CONNECT_TIMEOUT_S",
        5.0,
        "How long a producer keeps retrying an unreachable Redis before giving up.",
        ALL,
    )
    # Delivery and retries
    task_time_limit_s: int = setting(
        "VQ_TASK_TIME_LIMIT_S",
        600,
        "Longest a task may run on a worker before it fails with timeout.",
        WORKER_ONLY,
        same=True,
    )
    visibility_timeout_s: int = setting(
        "VQ_VISIBILITY_TIMEOUT_S",
        3600,
        "Last resort only: seconds before kombu redelivers a taken message that holds no "
        "lease. A dead worker's leased message is back after about VQ_LEASE_TTL_S (11 s). "
        "Must exceed VQ_TASK_TIME_LIMIT_S, which also bounds a task's wait for a free "
        "batch row (its deadline starts when a worker slot takes the message).",
        WORKER_ONLY,
        same=True,
    )
    restore_interval_s: int = setting(
        "VQ_RESTORE_INTERVAL_S",
        10,
        "How often kombu looks for messages without a lease past the visibility timeout "
        "(leased ones are handed back by the lease sweep every heartbeat).",
        WORKER_ONLY,
    )
    result_expires_s: int = setting(
        "VQ_RESULT_EXPIRES_S", 86400, "How long results (and staged images) are kept in Redis.", ALL
    )
    max_retries: int = setting(
        "VQ_MAX_RETRIES",
        3,
        "Retries of a transient failure (fetch 5xx, connection error).",
        WORKER_ONLY,
    )
    retry_backoff_s: float = setting(
        "VQ_RETRY_BACKOFF_S", 2.0, "First retry delay; doubles each retry.", WORKER_ONLY
    )
    retry_backoff_max_s: float = setting(
        "VQ_RETRY_BACKOFF_MAX_S", 60.0, "Longest retry delay.", WORKER_ONLY
    )
    lease_ttl_s: float = setting(
        "VQ_LEASE_TTL_S",
        10.0,
        "A worker's lease on each message it runs, renewed every heartbeat; once it lapses "
        "(the worker died or froze) a live worker hands the message back to the queue.",
        WORKER_ONLY,
        same=True,
    )
    max_deliveries: int = setting(
        "VQ_MAX_DELIVERIES",
        3,
        "Deliveries of one message (a worker died each time) before the task fails for good.",
        WORKER_ONLY,
    )
    priority_max_skips: int = setting(
        "VQ_PRIORITY_MAX_SKIPS",
        10,
        "Tasks a worker takes in a row from higher-priority lists while a lower one waits; "
        "its next task then comes from the waiting list, so low tasks are never starved.",
        WORKER_ONLY,
    )
    # Input limits
    max_image_bytes: int = setting(
        "VQ_MAX_IMAGE_BYTES", 20 * 1024 * 1024, "Largest image file.", ALL, same=True
    )
    max_image_pixels: int = setting(
        "VQ_MAX_IMAGE_PIXELS",
        40_000_000,
        "Largest width x height, checked before decoding pixels.",
        ALL,
        same=True,
    )
    max_images: int = setting("VQ_MAX_IMAGES", 8, "Most images in one request.", ALL, same=True)
    document_max_pages: int = setting(
        "VQ_DOCUMENT_MAX_PAGES", 100, "Most pages in one PDF document.", ALL, same=True
    )
    document_max_bytes: int = setting(
        "VQ_DOCUMENT_MAX_BYTES", 50 * 1024 * 1024, "Largest PDF document file.", ALL, same=True
    )
    document_dpi: int = setting(
        "VQ_DOCUMENT_DPI",
        150,
        "Resolution a PDF page is rendered at (scaled down to fit VQ_MAX_IMAGE_PIXELS).",
        ("gateway", "worker"),  # the gateway draws chat `file` parts' pages
    )
    document_page_time_limit_s: float = setting(
        "VQ_DOCUMENT_PAGE_TIME_LIMIT_S",
        30.0,
        "Longest time rendering one PDF page may take (in a child process, then killed).",
        ("gateway", "worker"),  # the gateway draws chat `file` parts' pages
    )
    document_page_memory_bytes: int = setting(
        "VQ_DOCUMENT_PAGE_MEMORY_BYTES",
        2 * 1024**3,
        "Most memory (address space) the child process drawing PDF pages may use; a page "
        "that needs more fails coded. At least 256 MiB + 16 bytes x VQ_MAX_IMAGE_PIXELS.",
        ("gateway", "worker"),  # the gateway draws chat `file` parts' pages
    )
    document_renders: int = setting(
        "VQ_DOCUMENT_RENDERS",
        2,
        "PDFs a process draws at once (each in a child of at most "
        "VQ_DOCUMENT_PAGE_MEMORY_BYTES): a worker's documents, a gateway's chat `file` parts; "
        "further ones wait their turn.",
        ("gateway", "worker"),
    )
    max_prompt_chars: int = setting("VQ_MAX_PROMPT_CHARS", 4000, "Longest prompt.", ALL, same=True)
    max_conversation_chars: int = setting(
        "VQ_MAX_CONVERSATION_CHARS",
        32000,
        "Most characters in all the messages of one conversation (ask with messages).",
        ALL,
        same=True,
    )
    max_new_tokens_caps: str = setting(
        "VQ_MAX_NEW_TOKENS_CAPS",
        DEFAULT_TOKEN_CAPS,
        "Per-task cap on max_new_tokens (also the default), as task=N pairs.",
        ALL,
        same=True,
    )
    default_num_crops: int = setting(
        "VQ_NUM_CROPS",
        0,
        "HD crops per image; 0 uses the checkpoint's preprocessor_config.json.",
        WORKER_ONLY,
    )
    longrope_switch: str = setting(
        "VQ_LONGROPE_SWITCH",
        "auto",
        "What a request does when its sequence first grows past the checkpoint's "
        "`original_max_position_embeddings` while decoding: `keep-cache` keeps the keys "
        "rotated with the short factors (Phi-3-vision's code), `recompute` re-prefills the "
        "sequence with the long factors (Phi-3.5-vision's code); `auto` reads which from "
        "config.json (docs/model.md).",
        WORKER_ONLY,
    )
    # Fetching images
    fetch_timeout_s: float = setting(
        "VQ_FETCH_TIMEOUT_S",
        20.0,
        "Total deadline for fetching one image URL, redirects included.",
        WORKER_ONLY,
    )
    fetch_max_redirects: int = setting(
        "VQ_FETCH_MAX_REDIRECTS", 3, "Redirects followed per URL.", WORKER_ONLY
    )
    allowed_private_hosts: str = setting(
        "VQ_ALLOWED_PRIVATE_HOSTS",
        "",
        "Comma-separated `host:port` entries a worker may fetch from even though they resolve "
        "to private addresses (private deployments only); a bare `host` allows ports 80 and "
        "443 only.",
        ALL,
        same=True,
    )
    local_image_roots: str = setting(
        "VQ_LOCAL_IMAGE_ROOTS",
        "",
        "Comma-separated folders a worker may read `path` images from; empty disables paths.",
        WORKER_ONLY,
    )
    # Worker
    model: str = setting(
        "VQ_MODEL",
        "microsoft/Phi-3-vision-128k-instruct",
        "Local folder or Hugging Face id.",
        WORKER_ONLY,
        same=True,
    )
    device: str = setting(
        "VQ_DEVICE", "auto", "cuda:N, cpu, or auto (first GPU, else CPU).", WORKER_ONLY
    )
    dtype: str = setting("VQ_DTYPE", "auto", "bfloat16, float16, float32, or auto.", WORKER_ONLY)
    attention: str = setting(
        "VQ_ATTENTION", "auto", "sdpa, flash_attention_2, eager, or auto.", WORKER_ONLY
    )
    max_batch: int = setting(
        "VQ_MAX_BATCH",
        0,
        "Requests a worker runs at once (its slots, decoded together in one batch); "
        "0 = 1 on CPU, 16 on CUDA (see docs/benchmarks.md).",
        WORKER_ONLY,
    )
    kv_cache_positions: int = setting(
        "VQ_KV_CACHE_POSITIONS",
        0,
        "KV cache positions the worker preallocates for all its requests together; "
        "0 = what free device memory allows (CUDA) or a quarter of free RAM (CPU).",
        WORKER_ONLY,
    )
    prefill_chunk_tokens: int = setting(
        "VQ_PREFILL_CHUNK_TOKENS",
        0,
        "Prompt positions prefilled per step while other requests decode; 0 = 1024 on "
        "CUDA, whole prompts on CPU.",
        WORKER_ONLY,
    )
    image_cache_bytes: int = setting(
        "VQ_IMAGE_CACHE_BYTES",
        -1,
        "Bytes a worker keeps of what images cost (crops, and the KV of a prompt's prefix "
        "ending with its images) for later tasks on the same images; -1 = 2 GiB on CPU, "
        "4 GiB on CUDA (where it comes out of the KV pool's share of free memory), 0 = off.",
        WORKER_ONLY,
    )
    worker_name: str = setting(
        "VQ_WORKER_NAME",
        "",
        "Worker node name; default gpu-<device>@host, gpu-<device>-2@host for a second "
        "worker on that device and host. Two running workers on one host never share one.",
        WORKER_ONLY,
    )
    metrics_port: int = setting(
        "VQ_METRICS_PORT", 0, "Prometheus metrics port; 0 turns it off.", WORKER_ONLY
    )
    metrics_address: str = setting(
        "VQ_METRICS_ADDRESS",
        "127.0.0.1",
        "Address the metrics server binds to; 0.0.0.0 (or ::) for a Prometheus on another host.",
        WORKER_ONLY,
    )
    health_file: str = setting(
        "VQ_HEALTH_FILE",
        "",
        "Heartbeat file for the health commands; default in the temp dir, named after the "
        "worker (`worker health` without a name finds the running ones there).",
        WORKER_ONLY,
    )
    heartbeat_interval_s: float = setting(
        "VQ_HEARTBEAT_INTERVAL_S",
        2.0,
        "How often the worker refreshes its health file.",
        WORKER_ONLY,
    )
    stuck_task_grace_s: float = setting(
        "VQ_STUCK_TASK_GRACE_S",
        120.0,
        "A task busy longer than VQ_TASK_TIME_LIMIT_S plus this is stuck: readiness fails; "
        "after as long again the worker hands the message back and exits (code 4).",
        WORKER_ONLY,
    )
    log_level: str = setting("VQ_LOG_LEVEL", "INFO", "Log level of both sides.", SERVERS)
    remote_control: str = setting(
        "VQ_REMOTE_CONTROL",
        "restricted",
        "Celery remote-control commands a worker answers: `restricted` (inspection, cancel "
        "and Flower's event switch; shutdown, pool and consumer changes are refused) or "
        "`full` (every Celery command, Flower's buttons included). docs/security.md.",
        WORKER_ONLY,
    )
    # Webhooks (sent by workers)
    webhook_secret: str = setting(
        "VQ_WEBHOOK_SECRET",
        "",
        "HMAC-SHA256 key that signs webhook bodies; empty: callback_url is refused.",
        SERVERS,
        same=True,
        secret=True,
    )
    webhook_max_attempts: int = setting(
        "VQ_WEBHOOK_MAX_ATTEMPTS",
        5,
        "Deliveries tried per webhook before it is dropped.",
        WORKER_ONLY,
    )
    webhook_backoff_s: float = setting(
        "VQ_WEBHOOK_BACKOFF_S",
        1.0,
        "Delay before the second webhook attempt; doubles each time.",
        WORKER_ONLY,
    )
    webhook_timeout_s: float = setting(
        "VQ_WEBHOOK_TIMEOUT_S",
        10.0,
        "Deadline of one webhook attempt (connect, send, answer).",
        WORKER_ONLY,
    )
    webhook_allowed_private_hosts: str = setting(
        "VQ_WEBHOOK_ALLOWED_PRIVATE_HOSTS",
        "",
        "Comma-separated callback hosts allowed although they resolve to private addresses: "
        "host:port, or a bare host for ports 80 and 443 only.",
        ALL,
        same=True,
    )
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

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        reader: Reader | None = None,
        **overrides: Any,
    ) -> Settings:
        """Read, convert and validate; one SettingsError naming all faults. With a `reader`,
        only its fields are checked (another's bad value leaves its default in place)."""
        env = os.environ if environ is None else environ
        values, problems = values_from_env(fields(cls), env, reader, overrides)
        if problems:
            raise SettingsError("; ".join(problems))
        settings = cls(**values)
        settings.validate(reader)
        return settings

    def validate(self, reader: Reader | None = None) -> None:
        """Raise one SettingsError naming every broken rule (of the fields `reader` reads)."""
        every = fields(self)
        values = {f.name: getattr(self, f.name) for f in every}
        env = {f.name: f.metadata["env"] for f in every}
        problems = settings_problems(values, env, {f.name for f in every if reads(f, reader)})
        if problems:
            raise SettingsError("; ".join(problems))

    def masked(self) -> dict[str, Any]:
        """Every setting by environment name, secrets masked: safe to log."""
        return masked_values(self, fields(self))

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.masked().items()) + ")"

    __str__ = __repr__


def settings_table() -> str:
    """docs/settings.md's table: every variable, its default, readers, agreement, meaning
    (the gateway's last, after the settings the other processes share)."""
    gateway = {f.name for f in fields(GatewaySettings)}
    every = fields(Settings)
    return markdown_table(
        [f for f in every if f.name not in gateway] + [f for f in every if f.name in gateway]
    )
