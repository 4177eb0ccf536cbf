"""The gateway's log lines: bounded under floods, no secrets, caller text clipped.

* `OncePerInterval` lets each kind of line (its format string, or for access lines its
  status class and route) through once per `INTERVAL_S`; the next one after the interval
  says how many were held back. So a flood of bad requests, idle connections or refused
  keys writes a few lines a minute, not one (or a traceback) per connection.
* Access lines are written here, not by uvicorn: the path without its query string (where
  a caller may put a key), clipped to `MAX_TEXT` characters, the method only if it is a
  known one. Headers are never logged.
"""

from __future__ import annotations

import logging
import threading
import time

INTERVAL_S = 10.0
MAX_TEXT = 200
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Loggers that see one line per connection or request under a flood.
FLOODED = ("uvicorn.error", "vision_queue.gateway", "vision_queue.gateway.access")

ALWAYS = "-"  # a record's `kind` that is never held back

access_log = logging.getLogger("vision_queue.gateway.access")


def clip(text: str, limit: int = MAX_TEXT) -> str:
    """Caller-controlled text as it may appear in a log line: printable, at most `limit`."""
    printable = text.encode("ascii", "backslashreplace").decode("ascii")
    printable = "".join(ch if " " <= ch <= "~" else "?" for ch in printable)
    return printable if len(printable) <= limit else printable[:limit] + "..."


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


class OncePerInterval(logging.Filter):
    """Pass each kind of record once per interval; the next passed one counts the rest."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._kinds: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        kind = getattr(record, "kind", None) or f"{record.name}:{record.msg}"
        if kind == ALWAYS:
            return True
        now = time.monotonic()
        with self._lock:
            since, held = self._kinds.get(kind, (0.0, 0))
            if since and now - since < self.interval_s:
                self._kinds[kind] = (since, held + 1)
                return False
            if len(self._kinds) > 1000:  # kinds are format strings and routes: few
                self._kinds.clear()
            self._kinds[kind] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like this in the last {self.interval_s:g} s)"
        if record.exc_info and held:
            record.exc_info = None  # one traceback per interval at most
        return True


def install(level: str = "INFO") -> None:
    """Put the filter on the flooded loggers of this process (idempotent); a process that
    uvicorn spawned gets the same stderr handler as the first."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    for name in FLOODED:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerInterval) for f in logger.filters):
            logger.addFilter(OncePerInterval())
    access_log.setLevel(logging.INFO)


def log_access(
    client: str,
    method: str,
    path: str,
    route: str,
    status: int,
    seconds: float,
    request_id: str = "-",
) -> None:
    """One access line. Successes all pass; refusals and errors once per interval per kind.
    The request id is the answer's `x-request-id` (already a checked token)."""
    extra = {"kind": f"access:{status}:{route}" if status >= 400 else ALWAYS}
    access_log.info(
        '%s - "%s %s" %d %.3fs id=%s',
        clip(client, 64),
        method_label(method),
        clip(path),
        status,
        seconds,
        clip(request_id, 64),
        extra=extra,
    )
