"""Redis Sentinel URLs: `sentinel://[:password@]host:port[/db];sentinel://host:port;...`.

The form is Celery's and kombu's own: each `;`-separated URL names one sentinel, and the
master they watch is named by VQ_REDIS_SENTINEL_MASTER. The Redis password (and user, and
database) sit in the first URL, where kombu and Celery's result backend both read them; the
sentinels' own password, if they have one, is VQ_REDIS_SENTINEL_PASSWORD. Every client then
asks the sentinels for the master's address whenever it connects, so after a failover its
next connection reaches the new master without a restart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

SCHEME = "sentinel"
DEFAULT_PORT = 26379
# Split only where the next URL begins, so a raw `;` inside a password never splits it.
_NEXT_URL = re.compile(r";(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(url: str) -> list[str]:
    """`a://x;b://y` -> [`a://x`, `b://y`]; a single URL -> [it]."""
    return _NEXT_URL.split(url)


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].strip().lower() == SCHEME


def spread_first_credentials(chunks: list[str]) -> list[str]:
    """Give every sentinel URL the first one's credentials and database, when it has none.

    kombu moves on to the next URL of the list after a failed connection attempt and reads
    the password and database from that URL alone, so a failover would otherwise leave the
    worker connecting to the new master without its password.
    """
    first = urlsplit(chunks[0])
    userinfo = chunks[0].partition("://")[2].rpartition("@")[0] if "@" in chunks[0] else ""
    spread = [chunks[0]]
    for chunk in chunks[1:]:
        scheme, _, rest = chunk.partition("://")
        rest, question, query = rest.partition("?")
        if userinfo and "@" not in rest:
            rest = f"{userinfo}@{rest}"
        if first.path.strip("/") and not urlsplit(chunk).path.strip("/"):
            rest = rest.rstrip("/") + "/" + first.path.strip("/")
        spread.append(f"{scheme}://{rest}{question}{query}")
    return spread


@dataclass(frozen=True)
class SentinelTarget:
    """What a sentinel URL says: where the sentinels are, and how to talk to the master."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int

    def master_kwargs(self) -> dict[str, Any]:
        """Connection options for the master (and replicas) the sentinels point to."""
        options: dict[str, Any] = {"db": self.db}
        if self.username:
            options["username"] = self.username
        if self.password is not None:
            options["password"] = self.password
        return options


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Raises ValueError with a message that never quotes the URL (it may hold a password)."""
    sentinels: list[tuple[str, int]] = []
    first: tuple[str | None, str | None, int] | None = None
    for index, chunk in enumerate(split_urls(url), start=1):
        parts = urlsplit(chunk)
        if parts.scheme.lower() != SCHEME:
            raise ValueError(f"URL {index} is not sentinel:// (all of them must be)")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(
                f"URL {index} has an invalid port (a number from 1 to 65535)"
            ) from None
        if not parts.hostname:
            raise ValueError(f"URL {index} has no host")
        sentinels.append((parts.hostname, port))
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        db = _database(parts.path, index)
        if first is None:
            first = (username, password, db)
            continue
        # kombu and Celery read credentials and db from the first URL only: a different one
        # further on would be ignored by some clients and not by others.
        if (
            (username is not None and username != first[0])
            or (password is not None and password != first[1])
            or (parts.path.strip("/") and db != first[2])
        ):
            raise ValueError(
                f"URL {index} names another password, user or database than the first; "
                "put them in the first URL only"
            )
    assert first is not None  # split_urls never returns an empty list
    return SentinelTarget(tuple(sentinels), first[0], first[1], first[2])


def _database(path: str, index: int) -> int:
    text = path.strip("/")
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"URL {index} has an invalid database (a number after the port)")
    return int(text)
