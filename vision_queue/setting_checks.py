"""The rules settings must meet: each broken one is a sentence naming its variables.

The rules see plain values, by field name, and the environment variable of each field, so
this module never needs the settings class (which imports it). `Settings.validate` raises
one SettingsError joining every sentence, so a deployment hears about all its mistakes at
once; a process checks only the fields it reads (a rule over several fields applies when
it reads any of them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from vision_queue.addresses import allowlist_entry
from vision_queue.pdf_render import least_page_memory
from vision_queue.redis_urls import redis_url_problems
from vision_queue.sentinel import is_sentinel_url
from vision_queue.setting_values import is_bind_address, key_digest, parse_caps, split_list

REMOTE_CONTROL_MODES = ("restricted", "full")
LONGROPE_SWITCH_MODES = ("auto", "keep-cache", "recompute")

_URLS = ("redis_url", "broker_url", "result_backend_url")
_ALLOWLISTS = ("allowed_private_hosts", "webhook_allowed_private_hosts")
_POSITIVE = (
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
    "gateway_max_connections",
    "gateway_redis_connections",
    "document_renders",
    "gateway_header_timeout_s",
    "gateway_body_timeout_s",
    "lease_ttl_s",
    "priority_max_skips",
)
_NOT_NEGATIVE = (
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
    "gateway_auth_failures_per_minute",
)


class _Rules:
    """The values and variable names of one settings object, and the fields to check."""

    def __init__(
        self, values: Mapping[str, Any], env: Mapping[str, str], checked: Collection[str]
    ) -> None:
        self.values, self.env, self.checked = values, env, checked
        self.problems: list[str] = []

    def applies(self, *names: str) -> bool:
        return any(name in self.checked for name in names)

    def each(self, names: tuple[str, ...], check: Callable[[str, Any], list[str]]) -> None:
        for name in names:
            if name in self.checked:
                self.problems.extend(check(self.env[name], self.values[name]))


def settings_problems(
    values: Mapping[str, Any], env: Mapping[str, str], checked: Collection[str]
) -> list[str]:
    """Every rule the fields in `checked` break, naming the environment variables involved.

    `values` and `env` map every field name to its value and its environment variable."""
    rules = _Rules(values, env, checked)
    rules.each(_URLS, lambda var, url: redis_url_problems(var, url) if url else [])
    if rules.applies(*_URLS, "redis_sentinel_master"):
        rules.problems.extend(_sentinel_problems(values, env))
    rules.each(_ALLOWLISTS, _allowlist_problems)
    rules.each(_POSITIVE, lambda var, value: [f"{var} must be positive"] if value <= 0 else [])
    rules.each(
        _NOT_NEGATIVE, lambda var, value: [f"{var} must not be negative"] if value < 0 else []
    )
    rules.each(
        ("image_cache_bytes",),
        lambda var, value: [f"{var} must be -1 (the default), 0 (off) or bytes"]
        if value < -1
        else [],
    )
    rules.each(("metrics_port",), _port_problems)
    rules.each(("metrics_address",), _bind_address_problems)
    rules.each(("queue",), _queue_problems)
    rules.each(("max_new_tokens_caps",), _caps_problems)
    rules.each(("api_keys",), _api_key_problems)
    rules.each(("remote_control",), _remote_control_problems)
    rules.each(("longrope_switch",), _one_of(LONGROPE_SWITCH_MODES))
    if (
        rules.applies("visibility_timeout_s", "task_time_limit_s")
        and values["visibility_timeout_s"] <= values["task_time_limit_s"]
    ):
        rules.problems.append(
            "VQ_VISIBILITY_TIMEOUT_S must be larger than VQ_TASK_TIME_LIMIT_S, or a running "
            "task would be delivered to a second worker"
        )
    if rules.applies("document_page_memory_bytes", "max_image_pixels"):
        rules.problems.extend(_page_memory_problems(values, env))
    if (
        rules.applies("lease_ttl_s", "heartbeat_interval_s")
        and values["lease_ttl_s"] < 2 * values["heartbeat_interval_s"]
    ):
        rules.problems.append(
            "VQ_LEASE_TTL_S must be at least twice VQ_HEARTBEAT_INTERVAL_S, or a late "
            "heartbeat would lose a healthy worker's lease"
        )
    return rules.problems


def _page_memory_problems(values: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    least = least_page_memory(values["max_image_pixels"])
    if values["document_page_memory_bytes"] >= least:
        return []
    return [
        f"{env['document_page_memory_bytes']} must be at least {least} bytes (256 MiB + 16 "
        f"bytes per pixel of {env['max_image_pixels']}), or no page at the pixel cap could "
        "be drawn"
    ]


def _allowlist_problems(var: str, raw: str) -> list[str]:
    problems = []
    for item in split_list(raw, lower=True):
        try:
            allowlist_entry(item)
        except ValueError as exc:
            problems.append(f"{var}: {exc}")
    return problems


def _port_problems(var: str, port: int) -> list[str]:
    return [f"{var} must be at most 65535"] if port > 65535 else []


def _bind_address_problems(var: str, address: str) -> list[str]:
    return [] if is_bind_address(address) else [f"{var} must be an IP address or a host name"]


def _queue_problems(var: str, queue: str) -> list[str]:
    return [] if re.fullmatch(r"[A-Za-z0-9_.-]+", queue) else [f"{var} must be a plain name"]


def _caps_problems(var: str, raw: str) -> list[str]:
    try:
        parse_caps(raw)
    except ValueError as exc:
        return [f"{var}: {exc}"]
    return []


def _api_key_problems(var: str, raw: str) -> list[str]:
    try:
        for entry in split_list(raw):
            key_digest(entry)
    except ValueError as exc:  # the message never quotes a key
        return [f"{var}: {exc}"]
    return []


def _remote_control_problems(var: str, mode: str) -> list[str]:
    if mode in REMOTE_CONTROL_MODES:
        return []
    return [f"{var} must be one of {', '.join(REMOTE_CONTROL_MODES)}"]


def _one_of(choices: tuple[str, ...]) -> Callable[[str, str], list[str]]:
    def check(var: str, value: str) -> list[str]:
        return [] if value in choices else [f"{var} must be one of {', '.join(choices)}"]

    return check


def _sentinel_problems(values: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    in_use = [env[name] for name in _URLS if is_sentinel_url(values[name])]
    master = values["redis_sentinel_master"]
    if in_use and not master.strip():
        return [
            f"VQ_REDIS_SENTINEL_MASTER must name the sentinels' master: "
            f"{', '.join(in_use)} is a sentinel:// URL"
        ]
    if master and not re.fullmatch(r"[A-Za-z0-9_.:-]+", master):
        return ["VQ_REDIS_SENTINEL_MASTER must be a plain name"]
    return []
