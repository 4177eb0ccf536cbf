"""The worker's side of streamed text: deltas appended to the task's Redis Stream.

The engine hands over text in whole characters as soon as it is final (`on_text`). The
writer coalesces it, one XADD per `FLUSH_INTERVAL_S` at most (the first piece at once),
from the generating thread: about one Redis round trip per 50 ms of generation. Writes go
through a Lua script that checks the task's lease, so a worker that lost its message
never writes into the stream its successor continues; a failed write keeps the text for
the next one (nothing is skipped), and the end of the task writes the rest together with
the result (`worker.delivery.results`).

A task that runs again after its worker died finds the deltas that worker already wrote:
it writes nothing until its own text has passed them, then continues the stream from
there (greedy decoding, or sampling with the seed the client fixed, repeats the same text),
so a reader sees no seam, no repeat and no gap.

A task that asked for logprobs (vision_queue.logprobs) has each delta carry, under
`logprobs` (a JSON list), the entries of the tokens generated since the previous delta;
entries not written by the end (tokens whose text was held back) are in the result's
`logprobs`, which holds them all. A rerun skips as many entries as earlier runs wrote.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

import redis

from vision_queue.logprobs import TokenLogprob
from vision_queue.protocol import LEASE_KEY, STREAM_MAX_ENTRIES
from vision_queue.streams import stream_key
from worker.delivery.results import StreamTail

if TYPE_CHECKING:
    from worker.broker.leases import Lease

log = logging.getLogger("vision_queue.task")

FLUSH_INTERVAL_S = 0.05

# KEYS: stream, lease. ARGV: owner ("" = no check), seq, text, expiry s, MAXLEN, logprobs
# JSON ("" = none).
_APPEND = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local id
if ARGV[6] ~= '' then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], '*',
                  'seq', ARGV[2], 'kind', 'delta', 'text', ARGV[3], 'logprobs', ARGV[6])
else
  id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], '*',
                  'seq', ARGV[2], 'kind', 'delta', 'text', ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('PUBLISH', KEYS[1], id)
return 1
"""


class StreamWriter:
    def __init__(
        self,
        client: redis.Redis,
        task_id: str,
        lease: Lease | None,
        expires_s: int,
        *,
        same_server: bool = True,
    ) -> None:
        self.client = client
        self.key = stream_key(task_id)
        self.task_id = task_id
        self.lease = lease
        self.expires_s = expires_s
        # The lease lives on the broker: checked in the script only when that is this Redis.
        self._owner = lease.owner if lease is not None and same_server else ""
        self._lease_key = LEASE_KEY.format(tag=lease.tag) if lease is not None else LEASE_KEY
        self._script = client.register_script(_APPEND)
        self._pieces: list[str] = []
        self._earlier = ""  # what an earlier run of this task already streamed
        self._written = 0  # characters of this run's text that are in the stream
        self._next_seq = 0
        self._last_flush = 0.0
        self._diverged = False
        self._logprobs: list[TokenLogprob] = []  # this run's, in order
        self._logprobs_written = 0  # entries of this run's list in the stream (or skipped)

    def begin(self) -> None:
        """Read what an earlier run streamed (empty for a first run)."""
        entries: list[Any] = self.client.xrange(self.key, "-", "+", STREAM_MAX_ENTRIES) or []
        texts: list[str] = []
        for _, fields in entries:
            values = {_text(k): _text(v) for k, v in fields.items()}
            if values.get("kind") == "delta":
                texts.append(values.get("text", ""))
                self._logprobs_written += _entries(values.get("logprobs"))
            self._next_seq = int(values.get("seq", "0") or 0) + 1
        self._earlier = "".join(texts)
        self._written = len(self._earlier)
        if self._earlier:
            log.info(
                "task id=%s: continuing a stream an earlier run began (%d characters)",
                self.task_id,
                len(self._earlier),
            )

    @property
    def text(self) -> str:
        """This run's text so far."""
        return "".join(self._pieces)

    def write(self, piece: str) -> None:
        self._pieces.append(piece)
        now = time.monotonic()
        # Two entries stay free for the end: the last delta and the end entry itself.
        room = self._next_seq < STREAM_MAX_ENTRIES - 2
        if room and not self._diverged and now - self._last_flush >= FLUSH_INTERVAL_S:
            self._flush(now)

    def write_logprobs(self, entry: TokenLogprob) -> None:
        """A token's logprobs: sent with the next delta (ahead of its text, or with it)."""
        self._logprobs.append(entry)

    def tail(self) -> StreamTail:
        """The unwritten rest, for the end entry written with the result."""
        rest = self._unwritten()
        delta_seq = self._next_seq
        return StreamTail(rest, delta_seq, delta_seq + 1 if rest else delta_seq)

    def _unwritten(self) -> str:
        if self._diverged:
            return ""
        full = self.text
        if len(full) <= len(self._earlier):
            if not self._earlier.startswith(full):
                self._diverge()
            return ""
        if not full.startswith(self._earlier):
            self._diverge()
            return ""
        return full[self._written :]

    def _flush(self, now: float) -> None:
        rest = self._unwritten()
        if not rest:
            return
        self._last_flush = now
        pending = self._logprobs[self._logprobs_written :]
        logprobs = json.dumps(pending, separators=(",", ":")) if pending else ""
        try:
            appended = self._script(
                keys=[self.key, self._lease_key],
                args=[
                    self._owner, self._next_seq, rest, self.expires_s, STREAM_MAX_ENTRIES,
                    logprobs,
                ],
            )
        except (redis.RedisError, OSError) as exc:
            # Kept for the next flush, or written with the result at the end.
            log.debug("task id=%s: stream append failed (%s)", self.task_id, exc)
            return
        if not appended:
            if self.lease is not None:
                self.lease.mark_lost()
            return
        self._written += len(rest)
        self._logprobs_written += len(pending)
        self._next_seq += 1

    def _diverge(self) -> None:
        if not self._diverged:
            self._diverged = True
            log.warning(
                "task id=%s: this run's text differs from what an earlier run streamed; "
                "the stream stops here and the stored result holds the text",
                self.task_id,
            )


def _entries(value: str | None) -> int:
    """How many logprobs entries a delta carried."""
    if not value:
        return 0
    try:
        entries = json.loads(value)
    except ValueError:
        return 0
    return len(entries) if isinstance(entries, list) else 0


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
