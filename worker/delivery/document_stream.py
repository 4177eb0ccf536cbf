"""A document's events stream: every page's text as it is generated, marked with its page.

Pages run as tasks of their own, side by side and on several workers, yet a reader follows
one stream, the document's (`vq:stream:<document id>`), whose sequence numbers must run
0, 1, 2... without gaps or repeats. So each page appends through one Lua script that
takes the next number from a counter beside the stream (`DOCUMENT_STREAM_STATE_KEY`), and
that also keeps, per page, how many characters of the page's text are in the stream:

* an append names the offset it continues from; the script appends only when that is
  where the page's text stands (a redelivered page, which repeats the same text, writes
  nothing until it has passed what its predecessor streamed: no repeat, no gap);
* a page's last characters (those its writer had not flushed when it ended) are written
  when the page reports its end (`write_page_rest`), before the document can end;
* the document's end closes the state (`close_document_stream`), so nothing is appended
  after the end entry, whose number it returns.

Each page keeps streaming its own text into its own stream too (worker.delivery.streams).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from vision_queue.documents import DOCUMENT_STREAM_STATE_KEY
from vision_queue.protocol import LEASE_KEY, STREAM_MAX_ENTRIES
from vision_queue.streams import stream_key

if TYPE_CHECKING:
    from worker.broker.leases import Lease

log = logging.getLogger("vision_queue.document")

FLUSH_INTERVAL_S = 0.05

# KEYS: stream, state, lease. ARGV: owner ("" = no check), page, offset (characters of the
# page's text already streamed, as the writer believes), text, its length in characters,
# expiry s, MAXLEN. Returns the page's streamed length after the call; -1 lease lost,
# -2 the document's stream has ended.
_APPEND = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[3]) ~= ARGV[1] then
  return -1
end
if redis.call('HEXISTS', KEYS[2], 'ended') == 1 then
  return -2
end
local field = 'p' .. ARGV[2]
local have = tonumber(redis.call('HGET', KEYS[2], field) or '0')
if have ~= tonumber(ARGV[3]) then
  return have
end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1) - 1
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[7], '*',
                      'seq', seq, 'kind', 'delta', 'text', ARGV[4], 'page', ARGV[2])
local now = redis.call('HINCRBY', KEYS[2], field, ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('PUBLISH', KEYS[1], id)
return now
"""

# KEYS: state. Marks the stream ended; returns the end entry's sequence number.
_CLOSE = """
redis.call('HSET', KEYS[1], 'ended', '1')
return tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
"""


def state_key(doc_id: str) -> str:
    return DOCUMENT_STREAM_STATE_KEY.format(doc_id=doc_id)


class PageStreamWriter:
    """One page run's text, appended to its document's stream (from the generating thread,
    at most one append per FLUSH_INTERVAL_S; a failed append is retried by the next)."""

    def __init__(
        self,
        client: redis.Redis,
        doc_id: str,
        page: int,
        lease: Lease | None,
        expires_s: int,
        *,
        same_server: bool = True,
    ) -> None:
        self.client = client
        self.doc_id = doc_id
        self.page = page
        self.lease = lease
        self.expires_s = expires_s
        self._owner = lease.owner if lease is not None and same_server else ""
        self._lease_key = LEASE_KEY.format(tag=lease.tag) if lease is not None else LEASE_KEY
        self._pieces: list[str] = []
        self._text = ""
        self._streamed = 0  # characters of the page's text in the document's stream
        self._last_flush = 0.0
        self._stopped = False

    def write(self, piece: str) -> None:
        self._pieces.append(piece)
        now = time.monotonic()
        if not self._stopped and now - self._last_flush >= FLUSH_INTERVAL_S:
            self._last_flush = now
            self._flush()

    def _flush(self) -> None:
        if self._pieces:
            self._text += "".join(self._pieces)
            self._pieces.clear()
        if len(self._text) <= self._streamed:
            return
        try:
            now = append(
                self.client,
                self.doc_id,
                self.page,
                self._streamed,
                self._text[self._streamed :],
                self.expires_s,
                owner=self._owner,
                lease_key=self._lease_key,
            )
        except (redis.RedisError, OSError) as exc:
            log.debug("document id=%s page=%d: append failed (%s)", self.doc_id, self.page, exc)
            return
        if now < 0:
            self._stopped = True
            if now == -1 and self.lease is not None:
                self.lease.mark_lost()
            return
        self._streamed = now


def append(
    client: redis.Redis,
    doc_id: str,
    page: int,
    offset: int,
    text: str,
    expires_s: int,
    *,
    owner: str = "",
    lease_key: str = LEASE_KEY,
) -> int:
    """Append `text` as page `page`'s characters from `offset` on; see `_APPEND`."""
    return int(
        client.eval(
            _APPEND,
            3,
            stream_key(doc_id),
            state_key(doc_id),
            lease_key,
            owner,
            page,
            offset,
            text,
            len(text),
            expires_s,
            STREAM_MAX_ENTRIES * 8,
        )
    )


def write_page_rest(client: redis.Redis, doc_id: str, page: int, text: str, expires_s: int) -> None:
    """A page ended with `text`: stream what of it the document's stream still lacks."""
    have = int(client.hget(state_key(doc_id), f"p{page}") or 0)
    for _ in range(3):  # a writer still running this page may move the offset meanwhile
        if have >= len(text):
            return
        have = append(client, doc_id, page, have, text[have:], expires_s)
        if have < 0:
            return


def close_document_stream(client: redis.Redis, doc_id: str) -> int:
    """No more page text: the sequence number the document's end entry takes."""
    return int(client.eval(_CLOSE, 1, state_key(doc_id)))


def tee(first: Callable[[str], None], second: Callable[[str], None]) -> Callable[[str], None]:
    def both(piece: str) -> None:
        first(piece)
        second(piece)

    return both
