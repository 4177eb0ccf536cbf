"""What each setting says about itself: its variable, default, meaning, readers, and more.

`setting()` declares a `Settings` field with that metadata, the one source for the
settings table in docs/settings.md, the `worker settings` columns and which fields a
process validates (`Settings.from_env(reader=...)`). Nothing here knows the settings class.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import Field, field
from typing import Any, Literal

from vision_queue.redis_urls import mask_url
from vision_queue.setting_values import convert

Reader = Literal["client", "gateway", "worker"]
# The processes that read settings. The gateway serves through an AsyncClient, so it reads
# everything a client reads; the `producer` CLI's commands are clients.
READERS: tuple[Reader, ...] = ("client", "gateway", "worker")
ALL: tuple[Reader, ...] = READERS
SERVERS: tuple[Reader, ...] = ("gateway", "worker")
GATEWAY_ONLY: tuple[Reader, ...] = ("gateway",)
WORKER_ONLY: tuple[Reader, ...] = ("worker",)


def setting(
    env: str,
    default: Any,
    doc: str,
    readers: tuple[Reader, ...],
    *,
    same: bool = False,
    secret: bool = False,
) -> Any:
    """A field and its metadata: `readers` are the processes that read it; `same` means
    every host of a deployment must give it the same value (for the Redis URLs: the same
    server and database), or producers and workers would disagree."""
    metadata = {"env": env, "doc": doc, "readers": readers, "same": same, "secret": secret}
    return field(default=default, metadata=metadata)


def reads(f: Field[Any], reader: Reader | None) -> bool:
    """Whether process `reader` reads field `f` (None: every process, so every field)."""
    return reader is None or reader in f.metadata["readers"]


def readers_text(f: Field[Any]) -> str:
    """`client, gateway, worker`: the processes that read `f`."""
    return ", ".join(f.metadata["readers"])


def same_text(f: Field[Any]) -> str:
    return "yes" if f.metadata["same"] else "no"


def markdown_table(every: Iterable[Field[Any]]) -> str:
    """The Markdown table of these fields: variable, default, readers, whether every host
    must agree on it, and meaning."""
    lines = [
        "| variable | default | read by | same on every host | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for f in every:
        default = f.default if f.default != "" else "(empty)"
        lines.append(
            f"| `{f.metadata['env']}` | `{default}` | {readers_text(f)} | {same_text(f)} "
            f"| {f.metadata['doc']} |"
        )
    return "\n".join(lines) + "\n"


def values_from_env(
    every: Iterable[Field[Any]],
    env: Mapping[str, str],
    reader: Reader | None,
    overrides: Mapping[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """The fields' values from `env` (converted) and `overrides`, and what did not convert:
    a problem only for a field `reader` reads (others keep their default)."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for f in every:
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        raw = env.get(f.metadata["env"])
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = convert(raw, type(f.default))
        except ValueError:
            if reads(f, reader):
                problems.append(
                    f"{f.metadata['env']}={raw!r} is not a valid {type(f.default).__name__}"
                )
    return values, problems


def masked_values(settings: object, every: Iterable[Field[Any]]) -> dict[str, Any]:
    """Every setting by environment name, secrets masked: safe to log."""
    out: dict[str, Any] = {}
    for f in every:
        value = getattr(settings, f.name)
        if f.metadata["secret"] and isinstance(value, str):
            # URLs keep their host (useful in logs); other secrets show nothing at all.
            value = mask_url(value) if "://" in value else ("****" if value else "")
        out[f.metadata["env"]] = value
    return out
