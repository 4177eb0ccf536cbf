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

A task with several choices (`options.n` above 1) generates them side by side, each on a
thread of its own: each choice is a lane of its own here (its text, what earlier runs
streamed of it, its logprobs), and its deltas carry `choice`, its index. One flush writes
every lane's new text in one script call, so the sequence stays one, without gaps; the end
writes each lane's rest before the end entry. A single-choice task's deltas carry no
`choice`, as before.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from vision_queue.generation_options import MAX_CHOICES
from vision_queue.logprobs import TokenLogprob
from vision_queue.protocol import LEASE_KEY, STREAM_MAX_ENTRIES
from vision_queue.streams import stream_key
from worker.delivery.results import StreamTail

if TYPE_CHECKING:
    from worker.broker.leases import Lease

log = logging.getLogger("vision_queue.task")

FLUSH_INTERVAL_S = 0.05

# KEYS: stream, lease. ARGV: owner ("" = no check), expiry s, MAXLEN, then per delta four
# values: seq, text, logprobs JSON ("" = none), choice ("" = none). One PUBLISH: a reader
# woken once reads every entry after its cursor.
_APPEND = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
local id
for i = 4, #ARGV, 4 do
  local entry = {'seq', ARGV[i], 'kind', 'delta', 'text', ARGV[i + 1]}
  if ARGV[i + 2] ~= '' then
    table.insert(entry, 'logprobs')
    table.insert(entry, ARGV[i + 2])
  end
  if ARGV[i + 3] ~= '' then
    table.insert(entry, 'choice')
    table.insert(entry, ARGV[i + 3])
  end
  id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', unpack(entry))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', KEYS[1], id)
return 1
"""


@dataclass
class _Lane:
    """One choice's text in the stream (the only lane, `None`, of a single-choice task)."""

    pieces: list[str] = field(default_factory=list)
    earlier: str = ""  # what an earlier run of this task already streamed of it
    written: int = 0  # characters of this run's text that are in the stream
    diverged: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)  # this run's, in order
    logprobs_written: int = 0  # entries of this run's list in the stream (or skipped)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


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
        self._lanes: dict[int | None, _Lane] = {}
        self._next_seq = 0
        self._last_flush = 0.0
        # A task's choices write from threads of their own.
        self._lock = threading.Lock()

    def begin(self) -> None:
        """Read what an earlier run streamed (empty for a first run)."""
        entries: list[Any] = self.client.xrange(self.key, "-", "+", STREAM_MAX_ENTRIES) or []
        for _, fields in entries:
            values = {_text(k): _text(v) for k, v in fields.items()}
            if values.get("kind") == "delta":
                lane = self._lane(_choice(values.get("choice")))
                lane.earlier += values.get("text", "")
                lane.logprobs_written += _entries(values.get("logprobs"))
            self._next_seq = int(values.get("seq", "0") or 0) + 1
        earlier = sum(len(lane.earlier) for lane in self._lanes.values())
        for lane in self._lanes.values():
            lane.written = len(lane.earlier)
        if earlier:
            log.info(
                "task id=%s: continuing a stream an earlier run began (%d characters)",
                self.task_id,
                earlier,
            )

    @property
    def text(self) -> str:
        """This run's text so far (a single-choice task's)."""
        lane = self._lanes.get(None)
        return lane.text if lane is not None else ""

    def write(self, piece: str, choice: int | None = None) -> None:
        """New text of the task (`choice`: of that choice, of a task with several)."""
        with self._lock:
            self._lane(choice).pieces.append(piece)
            now = time.monotonic()
            if now - self._last_flush >= FLUSH_INTERVAL_S:
                self._flush(now)

    def write_logprobs(self, entry: TokenLogprob, choice: int | None = None) -> None:
        """A token's logprobs: sent with the next delta (ahead of its text, or with it)."""
        with self._lock:
            self._lane(choice).logprobs.append(entry)

    def tail(self) -> StreamTail:
        """The unwritten rest, for the end entry written with the result."""
        with self._lock:
            delta_seq = self._next_seq
            if set(self._lanes) <= {None}:
                rest = self._unwritten(self._lanes[None]) if self._lanes else ""
                return StreamTail(rest, delta_seq, delta_seq + 1 if rest else delta_seq)
            rests = tuple(
                (choice, rest)
                for choice, lane in sorted(self._choice_lanes())
                if (rest := self._unwritten(lane))
            )
            return StreamTail("", delta_seq, delta_seq + len(rests), rests)

    def _lane(self, choice: int | None) -> _Lane:
        lane = self._lanes.get(choice)
        if lane is None:
            lane = self._lanes[choice] = _Lane()
        return lane

    def _choice_lanes(self) -> list[tuple[int, _Lane]]:
        return [(choice, lane) for choice, lane in self._lanes.items() if choice is not None]

    def _unwritten(self, lane: _Lane) -> str:
        if lane.diverged:
            return ""
        full = lane.text
        if len(full) <= len(lane.earlier):
            if not lane.earlier.startswith(full):
                self._diverge(lane)
            return ""
        if not full.startswith(lane.earlier):
            self._diverge(lane)
            return ""
        return full[lane.written :]

    def _flush(self, now: float) -> None:
        """Every lane's new text, one delta each, in one script call."""
        # Entries kept free for the end: each lane's last delta and the end entry itself
        # (a choice not heard from yet may still need one).
        kept = 2 if set(self._lanes) <= {None} else MAX_CHOICES + 1
        deltas: list[tuple[_Lane, str, int]] = []
        args: list[Any] = [self._owner, self.expires_s, STREAM_MAX_ENTRIES]
        for choice, lane in sorted(self._lanes.items(), key=lambda item: item[0] or 0):
            if self._next_seq + len(deltas) >= STREAM_MAX_ENTRIES - kept:
                break
            rest = self._unwritten(lane)
            if not rest:
                continue
            pending = lane.logprobs[lane.logprobs_written :]
            logprobs = json.dumps(pending, separators=(",", ":")) if pending else ""
            seq = self._next_seq + len(deltas)
            args += [seq, rest, logprobs, "" if choice is None else choice]
            deltas.append((lane, rest, len(pending)))
        if not deltas:
            return
        self._last_flush = now
        try:
            appended = self._script(keys=[self.key, self._lease_key], args=args)
        except (redis.RedisError, OSError) as exc:
            # Kept for the next flush, or written with the result at the end.
            log.debug("task id=%s: stream append failed (%s)", self.task_id, exc)
            return
        if not appended:
            if self.lease is not None:
                self.lease.mark_lost()
            return
        for lane, rest, pending_count in deltas:
            lane.written += len(rest)
            lane.logprobs_written += pending_count
        self._next_seq += len(deltas)

    def _diverge(self, lane: _Lane) -> None:
        if not lane.diverged:
            lane.diverged = True
            log.warning(
                "task id=%s: this run's text differs from what an earlier run streamed; "
                "the stream stops here and the stored result holds the text",
                self.task_id,
            )


def _choice(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


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
