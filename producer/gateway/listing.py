"""OpenAI's list pages (`GET /v1/files`, `GET /v1/batches`): `limit` objects after the
cursor `after`, with `first_id`, `last_id` and `has_more`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


async def list_page(
    ids: list[str],
    after: str | None,
    limit: int,
    load: Callable[[list[str]], Awaitable[list[dict[str, Any] | None]]],
) -> dict[str, Any]:
    """The page of `ids` (already in the list's order) after `after`, loaded with `load`
    (one object or None per id: None skips it). One more than `limit` is loaded, to know
    whether there are more. `load` takes the ids the page still needs at once, so a page
    is one Redis round trip (more only where ids were skipped), whatever its `limit`."""
    if after is not None and after in ids:
        ids = ids[ids.index(after) + 1 :]
    data: list[dict[str, Any]] = []
    while ids and len(data) <= limit:
        wanted, ids = ids[: limit + 1 - len(data)], ids[limit + 1 - len(data) :]
        data.extend(item for item in await load(wanted) if item is not None)
    more = len(data) > limit
    data = data[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }
