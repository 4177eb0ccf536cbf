"""Redis URLs as users write them: masked for printing, normalized for every client
library, and checked at start without ever quoting a password."""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit

from vision_queue.sentinel import (
    is_sentinel_url,
    parse_sentinel_url,
    split_urls,
    spread_first_credentials,
)

_QUERY_PASSWORD = re.compile(r"([?&])password=([^&]*)", re.IGNORECASE)
_REDIS_SCHEMES = ("redis", "rediss", "sentinel")


def mask_url(url: str) -> str:
    """`redis://:hunter2@host:6379/0` -> `redis://:****@host:6379/0`; never fails.

    Errs on the side of hiding: everything between `://` and the last `@` is credentials
    (so a password with a raw `#`, `/`, `?` or `@` is masked whole, even though no URL
    parser would read it as intended), the user name alone stays visible, and so does
    nothing of a `?password=` value.
    """
    if not isinstance(url, str):
        return "****"
    chunks = split_urls(url)
    if len(chunks) > 1:  # sentinel://...;sentinel://...: each keeps its host
        return ";".join(mask_url(chunk) for chunk in chunks)
    text = _QUERY_PASSWORD.sub(r"\1password=****", url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return "****" if "@" in text else text
    at = rest.rfind("@")
    if at < 0:
        return text
    user, colon, _password = rest[:at].partition(":")
    userinfo = f"{user}:****" if colon else "****"
    return f"{scheme}://{userinfo}{rest[at:]}"


def normalize_redis_url(url: str) -> str:
    """The same Redis URL in the one form every client library reads alike.

    kombu refuses `?password=` (a TypeError while the worker starts) although redis-py and
    Celery's result backend accept it, and a raw `#` or `/` in a password makes every URL
    parser read a different host. So a `password` query parameter moves into the userinfo,
    and the userinfo (everything up to the last `@`) is percent-encoded. unix:// URLs keep
    their query: redis-py reads `?password=` there, and kombu does not serve them.
    """
    chunks = split_urls(url)
    if len(chunks) > 1:  # sentinel://...;sentinel://...
        normalized = [normalize_redis_url(chunk) for chunk in chunks]
        if is_sentinel_url(url):
            normalized = spread_first_credentials(normalized)
        return ";".join(normalized)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _REDIS_SCHEMES:
        return url
    query_password: str | None = None
    match = _QUERY_PASSWORD.search(rest)
    if match is not None:
        query_password = unquote(match.group(2))
        start = match.start()
        rest = rest[:start] + rest[match.end() :]
        if match.group(1) == "?" and rest[start : start + 1] == "&":
            rest = rest[:start] + "?" + rest[start + 1 :]  # the next parameter leads now
    at = rest.rfind("@")
    userinfo, host = (rest[:at], rest[at + 1 :]) if at >= 0 else ("", rest)
    user, colon, password = userinfo.partition(":")
    if query_password is not None:
        password, colon = query_password, ":"
    elif colon:
        password = unquote(password)
    if not user and not colon:
        return f"{scheme}://{host}"
    encoded_user = quote(unquote(user), safe="")
    encoded = f"{encoded_user}:{quote(password, safe='')}" if colon else encoded_user
    return f"{scheme}://{encoded}@{host}"


def redis_url_problems(env: str, url: str) -> list[str]:
    """What is wrong with a Redis URL, without quoting it (it may hold a password)."""
    if is_sentinel_url(url):
        try:
            parse_sentinel_url(normalize_redis_url(url))
        except ValueError as exc:
            return [f"{env}: {exc}"]
        return []
    if len(split_urls(url)) > 1:
        return [f"{env}: only sentinel:// URLs may be joined with ;"]
    try:
        parts = urlsplit(normalize_redis_url(url))
    except ValueError:
        return [f"{env} is not a valid URL"]
    if parts.scheme not in ("redis", "rediss", "unix"):
        return [f"{env} must be a redis://, rediss://, unix:// or sentinel:// URL"]
    try:
        port = parts.port
    except ValueError:
        return [f"{env} has an invalid port (a number from 1 to 65535)"]
    if port == 0:
        return [f"{env} has an invalid port (a number from 1 to 65535)"]
    if parts.scheme != "unix" and not parts.hostname:
        return [f"{env} has no host"]
    return []
