"""OpenAI's list pages (`GET /v1/files`, `GET /v1/batches`): `limit` objects after the
cursor `after`, with `first_id`, `last_id` and `has_more`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


async def list_page(
    ids: list[str],
    after: str | None,
    limit: int,
    load: Callable[[str], Awaitable[dict[str, Any] | None]],
) -> dict[str, Any]:
    """The page of `ids` (already in the list's order) after `after`: each loaded with
    `load`, which skips an id by returning None. One more than `limit` is loaded, to know
    whether there are more."""
    if after is not None and after in ids:
        ids = ids[ids.index(after) + 1 :]
    data: list[dict[str, Any]] = []
    for item_id in ids:
        if len(data) > limit:
            break
        item = await load(item_id)
        if item is not None:
            data.append(item)
    more = len(data) > limit
    data = data[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }
