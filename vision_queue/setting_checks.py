"""The rules a settings object must meet as a whole: each broken one is a sentence.

`Settings.validate` raises one SettingsError joining every sentence, so a deployment
hears about all its mistakes at once.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import TYPE_CHECKING

from vision_queue.addresses import allowlist_entry
from vision_queue.redis_urls import redis_url_problems
from vision_queue.sentinel import is_sentinel_url
from vision_queue.setting_values import is_bind_address, parse_caps, split_list

if TYPE_CHECKING:
    from vision_queue.settings import Settings

REMOTE_CONTROL_MODES = ("restricted", "full")


def settings_problems(settings: Settings) -> list[str]:
    """Every rule `settings` breaks, naming the environment variables involved."""

    problems: list[str] = []
    for name in ("redis_url", "broker_url", "result_backend_url"):
        url = getattr(settings, name)
        if url:
            problems.extend(redis_url_problems(env_name(settings, name), url))
    problems.extend(_sentinel_problems(settings))
    for name in ("allowed_private_hosts", "webhook_allowed_private_hosts"):
        for item in split_list(getattr(settings, name), lower=True):
            try:
                allowlist_entry(item)
            except ValueError as exc:
                problems.append(f"{env_name(settings, name)}: {exc}")
    if settings.visibility_timeout_s <= settings.task_time_limit_s:
        problems.append(
            "VQ_VISIBILITY_TIMEOUT_S must be larger than VQ_TASK_TIME_LIMIT_S, or a running "
            "task would be delivered to a second worker"
        )
    for name in (
        "task_time_limit_s",
        "result_expires_s",
        "max_image_bytes",
        "max_image_pixels",
        "max_images",
        "max_prompt_chars",
        "max_deliveries",
        "connect_timeout_s",
        "fetch_timeout_s",
        "heartbeat_interval_s",
        "restore_interval_s",
        "stuck_task_grace_s",
        "max_conversation_chars",
        "webhook_max_attempts",
        "webhook_timeout_s",
        "gateway_max_body_bytes",
        "gateway_wait_timeout_s",
        "lease_ttl_s",
        "priority_max_skips",
    ):
        if getattr(settings, name) <= 0:
            problems.append(f"{env_name(settings, name)} must be positive")
    for name in (
        "max_retries",
        "fetch_max_redirects",
        "metrics_port",
        "default_num_crops",
        "max_batch",
        "kv_cache_positions",
        "prefill_chunk_tokens",
        "webhook_backoff_s",
        "gateway_requests_per_minute",
        "gateway_request_burst",
        "gateway_max_tasks_per_key",
    ):
        if getattr(settings, name) < 0:
            problems.append(f"{env_name(settings, name)} must not be negative")
    if settings.metrics_port > 65535:
        problems.append("VQ_METRICS_PORT must be at most 65535")
    if not is_bind_address(settings.metrics_address):
        problems.append("VQ_METRICS_ADDRESS must be an IP address or a host name")
    if settings.lease_ttl_s < 2 * settings.heartbeat_interval_s:
        problems.append(
            "VQ_LEASE_TTL_S must be at least twice VQ_HEARTBEAT_INTERVAL_S, or a late "
            "heartbeat would lose a healthy worker's lease"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", settings.queue):
        problems.append("VQ_QUEUE must be a plain name")
    try:
        parse_caps(settings.max_new_tokens_caps)
    except ValueError as exc:
        problems.append(f"VQ_MAX_NEW_TOKENS_CAPS: {exc}")
    try:
        settings.api_key_digests  # noqa: B018 (validates every entry)
    except ValueError as exc:
        problems.append(f"VQ_API_KEYS: {exc}")
    if settings.remote_control not in REMOTE_CONTROL_MODES:
        problems.append(f"VQ_REMOTE_CONTROL must be one of {', '.join(REMOTE_CONTROL_MODES)}")
    return problems


def env_name(settings: Settings, field_name: str) -> str:
    return str(next(f.metadata["env"] for f in fields(settings) if f.name == field_name))


def _sentinel_problems(settings: Settings) -> list[str]:
    in_use = [
        env_name(settings, name)
        for name in ("redis_url", "broker_url", "result_backend_url")
        if is_sentinel_url(getattr(settings, name))
    ]
    if in_use and not settings.redis_sentinel_master.strip():
        return [
            f"VQ_REDIS_SENTINEL_MASTER must name the sentinels' master: "
            f"{', '.join(in_use)} is a sentinel:// URL"
        ]
    if settings.redis_sentinel_master and not re.fullmatch(
        r"[A-Za-z0-9_.:-]+", settings.redis_sentinel_master
    ):
        return ["VQ_REDIS_SENTINEL_MASTER must be a plain name"]
    return []
