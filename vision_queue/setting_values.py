"""How the settings' text values are read: booleans, lists, allow-lists, API keys, caps.

Each parser raises ValueError with a message that never quotes a secret; `Settings`
turns it into a SettingsError naming the variable.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import re
from collections.abc import Callable
from typing import Any

from vision_queue.addresses import allowlist_entry
from vision_queue.protocol import TaskName

DEFAULT_TOKEN_CAPS = "describe=512,ocr=1024,compare=768,ask=1024"  # noqa: S105 (not a secret)


def convert(raw: str, kind: type) -> Any:
    """An environment variable's text as the type of its field; ValueError if it is not."""
    return _CONVERTERS[kind](raw)


def parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def is_bind_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", text))
    return True


def allowlist(raw: str) -> frozenset[str]:
    entries: set[str] = set()
    for item in split_list(raw, lower=True):
        with contextlib.suppress(ValueError):  # refused by validate() at start
            entries.add(allowlist_entry(item))
    return frozenset(entries)


def split_list(raw: str, *, lower: bool = False) -> list[str]:
    items = [item.strip() for item in raw.split(",") if item.strip()]
    return [item.lower() for item in items] if lower else items


_MIN_API_KEY_CHARS = 20
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def key_digest(entry: str) -> str:
    """`sha256:<hex>` as given, a raw key hashed; never echoes a key in an error."""
    if entry.lower().startswith("sha256:"):
        digest = entry[7:].lower()
        if not _HEX_DIGEST.fullmatch(digest):
            raise ValueError("a sha256: entry must hold 64 hex digits")
        return digest
    if len(entry) < _MIN_API_KEY_CHARS:
        raise ValueError(f"every key needs at least {_MIN_API_KEY_CHARS} characters")
    return hashlib.sha256(entry.encode()).hexdigest()


def parse_caps(raw: str) -> dict[TaskName, int]:
    caps = parse_caps_pairs(DEFAULT_TOKEN_CAPS)
    caps.update(parse_caps_pairs(raw))
    return caps


def parse_caps_pairs(raw: str) -> dict[TaskName, int]:
    caps: dict[TaskName, int] = {}
    for pair in split_list(raw):
        name, _, number = pair.partition("=")
        try:
            task = TaskName(name.strip())
        except ValueError:
            raise ValueError(f"unknown task {name.strip()!r}") from None
        cap = int(number)
        if cap <= 0:
            raise ValueError(f"cap for {task.value} must be positive")
        caps[task] = cap
    return caps


_CONVERTERS: dict[type, Callable[[str], Any]] = {
    str: str,
    int: lambda raw: int(raw.strip()),
    float: lambda raw: float(raw.strip()),
    bool: parse_bool,
}
