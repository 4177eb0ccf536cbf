"""Runs the batches: queues their lines as the queue drains, records each line's end, and
writes the output and error files. Every gateway process runs one feeder.

Each pass looks at every active batch whose lease (`vq:gw:batch:{id}:lease`, renewed each
pass, expiring after `LEASE_MS`) it holds or can take, so one process works on a batch at
a time and another takes over within `LEASE_MS` if it dies. For a batch it:

1. records the lines whose task has ended (`RECORD`: once, whoever reads it; usage is
   counted then), re-queues a line whose task never reached the queue (taken more than
   `REQUEUE_AFTER_MS` ago, not yet marked queued, no `submitted` marker, no result: the
   process died between taking the line and queueing it), and when the batch is
   cancelling, cancels and records the lines still waiting in the queue (running ones
   finish);
2. tops up the lines in flight to `IN_FLIGHT`: the cursor moves first (`ADVANCE`, a
   compare-and-set), then the tasks are queued under ids derived from the batch id and the
   line's position (`batch_lines.line_task_id`). A line is queued at most once: re-queueing
   needs the line's task to have no trace, and a queued task's id never changes;
3. ends the batch when every line has ended (completed, or cancelled), or when its window
   has passed (expired: the lines in flight are cancelled, finished lines are kept).

A batch of 100,000 lines thus never has more than `IN_FLIGHT` messages in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any

from producer.gateway import batch_lines as lines
from producer.gateway import batch_store as store
from producer.gateway import files, usage
from producer.gateway.state import GatewayState
from producer.gateway.submission import OWNER_KEY
from vision_queue.errors import UnknownTaskId, VisionQueueError
from vision_queue.protocol import Priority
from vision_queue.results import result_json

log = logging.getLogger(__name__)

PASS_S = 0.5
LEASE_MS = 20_000
IN_FLIGHT = 64
REQUEUE_AFTER_MS = 15_000
WARN_EVERY_S = 30.0
QUEUED = store.QUEUED


class BatchFeeder:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.redis = state.redis
        self.token = secrets.token_hex(8)

    async def run(self) -> None:
        last_warning = 0.0
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away, say: try again on the next pass
                if time.monotonic() - last_warning > WARN_EVERY_S:  # not twice a second
                    last_warning = time.monotonic()
                    log.warning("batch feeder pass failed (retrying): %r", exc)
            await asyncio.sleep(PASS_S)

    async def run_once(self) -> None:
        for raw in await self.redis.smembers(store.ACTIVE_KEY):
            batch_id = store._text(raw)
            lease = store.key(batch_id, "lease")
            if not await self.redis.eval(store.LEASE, 1, lease, self.token, LEASE_MS):
                continue
            await self.step(batch_id)

    async def step(self, batch_id: str) -> None:
        record = await store.read(self.redis, batch_id)
        if record is None:
            await self.redis.srem(store.ACTIVE_KEY, batch_id)
            return
        status = record["status"]
        if status in store.ENDED:
            await self.redis.srem(store.ACTIVE_KEY, batch_id)
            return
        meta = record["meta"]
        await self.collect(batch_id, meta, status)
        record = await store.read(self.redis, batch_id) or record
        status = record["status"]
        if time.time() >= meta["expires_at"] and status != "finalizing":
            await self.stop_in_flight(batch_id)
            await self.finish(batch_id, "expired")
            return
        cursor = int(record["cursor"])
        waiting = await self.redis.hlen(store.key(batch_id, "inflight"))
        if status == "in_progress" and cursor < meta["valid"]:
            await self.feed(batch_id, meta, cursor, IN_FLIGHT - waiting)
        elif status == "cancelling" and waiting == 0:
            await self.finish(batch_id, "cancelled")
        elif status == "finalizing":  # a pass that died while writing the files
            await self.finish(batch_id, record.get("ending") or "completed")
        elif status == "in_progress" and waiting == 0:
            await self.finish(batch_id, "completed")

    # Lines in flight --------------------------------------------------------------------

    async def collect(self, batch_id: str, meta: dict[str, Any], status: str) -> None:
        flight = await self.redis.hgetall(store.key(batch_id, "inflight"))
        if not flight:
            return
        positions = sorted(int(p) for p in flight)
        ids = [lines.line_task_id(batch_id, p) for p in positions]
        outcomes = await asyncio.gather(
            *(self.state.client.result(i) for i in ids), return_exceptions=True
        )
        for position, task_id, outcome in zip(positions, ids, outcomes, strict=True):
            queued = store._text(flight.get(str(position).encode(), flight.get(str(position))))
            if isinstance(outcome, UnknownTaskId):
                if status == "cancelling":  # never queued: it need not be now
                    message = "the batch was cancelled"
                    await self.unrun(batch_id, position, task_id, "batch_cancelled", message)
                elif queued != QUEUED and _ms() - int(queued) > REQUEUE_AFTER_MS:
                    await self.requeue(batch_id, meta, position, queued)
                continue
            if isinstance(outcome, BaseException):
                raise outcome
            if outcome is None:
                if status == "cancelling":
                    await self.cancel_if_waiting(batch_id, meta, position, task_id)
                continue
            await self.record_result(batch_id, meta, position, task_id, result_json(outcome))

    async def record_result(
        self,
        batch_id: str,
        meta: dict[str, Any],
        position: int,
        task_id: str,
        result: dict[str, Any],
    ) -> None:
        line = await self.line(batch_id, position)
        ok, out = lines.finished(
            meta["endpoint"],
            line["body"],
            self.state.settings.gateway_model_name,
            task_id,
            line["custom_id"],
            result,
        )
        await self.record(batch_id, position, ok, out)
        await usage.count(self.state, meta["owner"], task_id, result)

    async def record(self, batch_id: str, position: int, ok: bool, out: dict[str, Any]) -> bool:
        keys = [store.key(batch_id), store.key(batch_id, "inflight"), store.key(batch_id, "done")]
        value = ("o" if ok else "e") + json.dumps(out)
        counter = "completed" if ok else "failed"
        done = await self.redis.eval(store.RECORD, 3, *keys, position, value, counter)
        return bool(done)

    async def cancel_if_waiting(
        self, batch_id: str, meta: dict[str, Any], position: int, task_id: str
    ) -> None:
        """A cancelled batch's line still in the queue never runs; a running one finishes."""
        if (await self.state.client.status(task_id)).state != "PENDING":
            return
        await self.unrun(batch_id, position, task_id, "batch_cancelled", "the batch was cancelled")

    async def stop_in_flight(self, batch_id: str) -> None:
        """The window ended: every line in flight, queued or running, is cancelled."""
        for raw in await self.redis.hkeys(store.key(batch_id, "inflight")):
            position = int(raw)
            task_id = lines.line_task_id(batch_id, position)
            message = "the batch's window ended"
            await self.unrun(batch_id, position, task_id, "batch_expired", message)

    async def unrun(
        self, batch_id: str, position: int, task_id: str, code: str, message: str
    ) -> None:
        with contextlib.suppress(UnknownTaskId):
            await self.state.client.cancel(task_id)
        line = await self.line(batch_id, position)
        await self.record(
            batch_id, position, False, lines.unrun(line["custom_id"], task_id, code, message)
        )

    async def line(self, batch_id: str, position: int) -> dict[str, Any]:
        raw = await self.redis.lindex(store.key(batch_id, "lines"), position)
        if raw is None:
            raise LookupError(f"batch {batch_id} has no line {position}")
        parsed: dict[str, Any] = json.loads(raw)
        return parsed

    # Queueing -----------------------------------------------------------------------------

    async def feed(self, batch_id: str, meta: dict[str, Any], cursor: int, room: int) -> None:
        count = min(room, int(meta["valid"]) - cursor)
        if count <= 0:
            return
        keys = [store.key(batch_id), store.key(batch_id, "inflight")]
        first = await self.redis.eval(store.ADVANCE, 2, *keys, cursor, count, _ms())
        if int(first) < 0:
            return
        for position in range(int(first), int(first) + count):
            await self.submit(batch_id, meta, position)

    async def requeue(
        self, batch_id: str, meta: dict[str, Any], position: int, queued: str
    ) -> None:
        inflight = store.key(batch_id, "inflight")
        if await self.redis.eval(store.REQUEUE, 1, inflight, position, queued, _ms()):
            log.info("batch %s: line %d never reached the queue; queueing it", batch_id, position)
            await self.submit(batch_id, meta, position)

    async def submit(self, batch_id: str, meta: dict[str, Any], position: int) -> None:
        line = await self.line(batch_id, position)
        task_id = lines.line_task_id(batch_id, position)
        settings = self.state.settings
        try:
            request = lines.to_request(
                meta["endpoint"],
                line["body"],
                settings.gateway_model_name,
                settings,
                Priority(meta["priority"]),
                task_id,
            )
            # The line's task is the batch key's, as a task it queued itself would be.
            owner = OWNER_KEY.format(task_id=task_id)
            await self.redis.set(owner, meta["owner"], ex=settings.result_expires_s)
            await self.state.client.submit_many([request])
            # Queued for sure now: never again, even once its `submitted` marker expires.
            await self.redis.eval(store.MARK_QUEUED, 1, store.key(batch_id, "inflight"), position)
        except (ValueError, VisionQueueError) as exc:  # checked at creation: should not happen
            out = lines.unrun(line["custom_id"], task_id, "invalid_request", str(exc)[:500])
            await self.record(batch_id, position, False, out)

    # The end ---------------------------------------------------------------------------------

    async def finish(self, batch_id: str, final: str) -> None:
        """Write the output and error files, then the final status (idempotent: the file ids
        are the batch's own, so a pass that dies half-way is redone by the next)."""
        record = await store.read(self.redis, batch_id)
        if record is None or record["status"] in store.ENDED:
            return
        meta, now = record["meta"], int(time.time())
        if record["status"] != "finalizing":
            moving = {"status": "finalizing", "finalizing_at": now, "ending": final}
            await self.redis.hset(store.key(batch_id), mapping=moving)  # type: ignore[arg-type]
        done = await self.redis.hgetall(store.key(batch_id, "done"))
        output: list[str] = []
        errors = [
            store._text(r) for r in await self.redis.lrange(store.key(batch_id, "refused"), 0, -1)
        ]
        completed = failed = 0
        for position in sorted(int(p) for p in done):
            value = store._text(done.get(str(position).encode(), done.get(str(position))))
            if value[0] == "o":
                output.append(value[1:])
                completed += 1
            else:
                errors.append(value[1:])
                failed += 1
        code = {"expired": "batch_expired", "cancelled": "batch_cancelled"}.get(final)
        cursor = int(record["cursor"])
        if code is not None:
            texts = await self.redis.lrange(store.key(batch_id, "lines"), cursor, -1)
            for offset, raw in enumerate(texts):
                task_id = lines.line_task_id(batch_id, cursor + offset)
                custom_id = json.loads(raw)["custom_id"]
                errors.append(json.dumps(lines.unrun(custom_id, task_id, code, "never queued")))
                failed += 1
        fields: dict[str, Any] = {
            "completed": completed,
            "failed": failed,
            "status": final,
            f"{final}_at": now,
        }
        suffix = batch_id.removeprefix("batch_")
        owner = meta["owner"]
        for lines_of, name, kind, field in (
            (output, "output", "output", "output_file_id"),
            (errors, "error", "errors", "error_file_id"),
        ):
            if lines_of:
                stored = await files.store(
                    self.state,
                    owner,
                    _jsonl(lines_of),
                    f"{batch_id}_{name}.jsonl",
                    "batch_output",
                    file_id=f"file-{suffix}-{kind}",
                    quota=False,
                )
                fields[field] = stored["id"]
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(store.key(batch_id), mapping=fields)  # type: ignore[arg-type]
        pipe.delete(
            *(store.key(batch_id, part) for part in ("lines", "inflight", "done", "refused"))
        )
        pipe.expire(store.key(batch_id), files.RETENTION_S)
        pipe.srem(store.ACTIVE_KEY, batch_id)
        pipe.delete(store.key(batch_id, "lease"))
        await pipe.execute()
        log.info("batch %s %s: %d completed, %d failed", batch_id, final, completed, failed)


def _jsonl(items: list[str]) -> bytes:
    return ("\n".join(items) + "\n").encode()


def _ms() -> int:
    return int(time.time() * 1000)


async def run_feeder(state: GatewayState) -> None:
    """The gateway's background task (app lifespan)."""
    await BatchFeeder(state).run()
