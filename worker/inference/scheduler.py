"""Continuous batching: who runs in the next step, beside the engine and apart from the model.

Requests arrive preprocessed (token ids, image crops) as `Job`s from the threads that
serve them. One device thread owns the model and loops:

1. drop every row whose job was cancelled (its region is free at once);
2. admit waiting jobs, first come first served, while a batch row is free and the KV
   pool has a contiguous region for the job's prompt plus its token budget (the region
   is reserved for the job's whole life, so a running request never runs out of cache);
3. ask the runner for one prefill unit of the oldest admitted job still prefilling (a
   group of at most `vision_unit_crops` of its image crops through the image tower, or
   one chunk of `prefill_chunk_tokens` prompt positions; the runner does the work), so a
   long prompt delays the running decodes by one unit, not by all of it. The prefix that
   ends with a prompt's last image is a unit of its own, which the image cache may serve
   instead (worker.model.image_cache: copied into the row's region; the entry stays
   pinned until the row leaves);
4. run one batched decode step over every row past its prefill, and hand each job its
   token; a job that reaches an end token or its budget leaves the batch now.

Overlap with the device (worker.model.steps): steps 3 and 4 only *launch* work; the
iteration then reads the previous iteration's decode step (the one host-device sync per
step) and delivers its tokens, while the step it just launched keeps the device busy. So
the host work of a step (cancels, admission, building inputs, delivering tokens) runs
while the device works. A row's input token that the host has not read yet stays on the
device (`UNKNOWN_TOKEN`). Whatever launch is already done is read at once, so on the CPU,
where a launch is synchronous, each iteration delivers its own tokens exactly as a
synchronous loop (`overlap=False` makes every iteration wait for its own launches).
What the host cannot know ahead is whether a row's in-flight token ends it (an end
token, a cancel): such a row may be in one more launched step, whose token is dropped;
its budget, position and the LongRoPE switch are known ahead and never overrun.

LongRoPE switch under `recompute` (Phi-3.5-vision's code; `recompute_past` set): a row
whose sequence is about to grow past `recompute_past` positions (its prompt within it,
its next fed token the first beyond) leaves the decode batch and goes back to
prefilling: its whole sequence so far, the prompt's kept embeddings plus every token it
generated, is prefilled again into its own region, now with the long factors, in
prefill units like any prompt; the token that prefill yields is its next one, and it
rejoins the decode batch. It keeps its place among the prefilling rows by admission
time. The region reserved at admission already holds that many positions, cancel and
deadline reach it as any row, and its job's stream just sees one slower token. Under
`keep-cache` (Phi-3-vision's code, `recompute_past` None) rows decode on, the keys they
cached under the short factors kept.

The job's own thread turns tokens into text (stop strings included) and calls its hooks;
when a hook raises or a stop string ends the text, that thread cancels the job. Nothing
here waits for the longest request in a batch, and nothing here knows about Celery.

Failures stay with the requests they belong to: a prefill that fails (out of memory
included) fails its job only; an out-of-memory in a decode step halves the decode group
and retries, failing a row only when it cannot run even alone; any other decode failure
fails the rows of that step. The loop itself keeps running.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

import torch

from vision_queue.errors import ModelError, ResourceExhausted, VisionQueueError
from worker.inference import faults
from worker.inference.events import Event, Failed, Finished, Token
from worker.inference.rows import Job, Launch, Row, allocate_all, sampler_for
from worker.model.errors import model_errors
from worker.model.kvcache import KVPool
from worker.model.model_runner import PromptPrefill
from worker.model.runner_api import Runner
from worker.model.steps import UNKNOWN_TOKEN, RowLogprobs

__all__ = ["Event", "Failed", "Finished", "Job", "Scheduler", "Token"]

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        runner: Runner,
        pool: KVPool,
        *,
        stop_ids: frozenset[int],
        max_rows: int,
        max_row_positions: int,
        prefill_chunk_tokens: int | None = None,
        vision_unit_crops: int | None = None,
        recompute_past: int | None = None,
        recover: Callable[[], None] = lambda: None,
        overlap: bool = True,
    ) -> None:
        self.runner = runner
        self.pool = pool
        self.stop_ids = stop_ids
        self.max_rows = max_rows
        self.max_row_positions = max_row_positions
        self.prefill_chunk_tokens = prefill_chunk_tokens or None
        self.vision_unit_crops = vision_unit_crops or None
        # original_max_position_embeddings when rows recompute at the LongRoPE switch.
        self.recompute_past = recompute_past
        self.recover = recover
        self._waiting: collections.deque[Job] = collections.deque()
        self._prefilling: list[Row] = []
        self._decoding: list[Row] = []
        self._decode_limit = max_rows  # halved by an out-of-memory in a decode step
        self._in_flight: collections.deque[Launch] = collections.deque()
        # Leave this iteration's last launch unread at its end (else wait for it too).
        self.overlap = overlap
        self.sync_wait_s = 0.0  # time the device thread spent waiting for the device
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for tests and metrics

    # Request side (any thread) -----------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job and make sure the device thread runs."""
        self.enqueue(job)
        self._ensure_running()

    def enqueue(self, job: Job) -> None:
        """Queue a job without starting the device thread (tests drive `step()` themselves)."""
        if job.positions_needed > self.max_row_positions:
            raise ResourceExhausted(
                f"{job.encoded.prompt_tokens} prompt tokens + {job.max_new_tokens} new tokens "
                f"need {job.positions_needed} KV positions; this worker holds at most "
                f"{self.max_row_positions} for one request"
            )
        group = (1 + len(job.siblings)) * job.positions_needed
        if job.siblings and group > self.pool.positions:
            raise ResourceExhausted(
                f"{1 + len(job.siblings)} choices need {group} KV positions; this worker "
                f"holds {self.pool.positions}"
            )
        with self._wake:
            if self._stopping:
                raise ModelError("the engine is shutting down")
            self._waiting.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Abandon a job: it leaves its row (or the queue) at the next step."""
        job._cancelled.set()
        with self._wake:
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        with self._wake:
            waiting = len(self._waiting)
        return {
            "waiting": waiting,
            "prefilling": len(self._prefilling),
            "decoding": len(self._decoding),
            "free_kv_positions": self.pool.allocator.free_positions,
        }

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=30)
        else:
            self._fail_all(ModelError("the engine stopped"))

    def _ensure_running(self) -> None:
        with self._wake:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="vq-scheduler", daemon=True)
                self._thread.start()

    # Device thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopping and not self._has_work():
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self.step()
                except Exception:  # a bug here must not strand every request
                    log.exception("scheduler step failed")
                    self._fail_all(ModelError("internal error in the batch scheduler"))
        self._fail_all(ModelError("the engine stopped"))

    def _has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding or self._in_flight)

    def step(self) -> None:
        """One iteration: drop cancelled rows, admit, launch one prefill unit and one decode
        step, then read what was launched before (waiting for all but the newest launch)."""
        self._drop_cancelled()
        self._admit()
        before = len(self._in_flight)
        if self._prefilling:
            self._prefill_unit(self._prefilling[0])
            self._read(keep=len(self._in_flight))  # a first token already chosen (the CPU)
        if self._decoding:
            self._decode_step()
        # Only a launch of this iteration stays in flight: nothing waits for a next one.
        launched = len(self._in_flight) > before
        self._read(keep=1 if launched and self.overlap else 0)

    def _read(self, *, keep: int) -> None:
        """Wait for every launch but the newest `keep`, then take the ones already done."""
        in_flight = self._in_flight
        while in_flight and (len(in_flight) > keep or in_flight[0].tokens.ready()):
            launch = in_flight.popleft()
            began = time.perf_counter()
            try:
                with model_errors(launch.what):
                    tokens = launch.tokens.tokens()
            except VisionQueueError as error:
                for row in launch.rows:
                    if not row.done:
                        self._fail(row, error)
                continue
            finally:
                self.sync_wait_s += time.perf_counter() - began
            if launch.prefill_from:
                launch.rows[0].prefill_s += time.perf_counter() - launch.prefill_from
            logprobs = launch.tokens.logprobs()
            for row, token, chosen in zip(launch.rows, tokens, logprobs, strict=True):
                if not row.done:
                    self._deliver(row, token, chosen)

    def _drop_cancelled(self) -> None:
        for rows in (self._prefilling, self._decoding):
            for row in [r for r in rows if r.job.cancelled]:
                self._finish(row, "cancelled")
        with self._wake:
            kept = [job for job in self._waiting if not job.cancelled]
            self._waiting = collections.deque(kept)

    def _admit(self) -> None:
        while True:
            with self._wake:
                if not self._waiting:
                    return
                job = self._waiting[0]
                group = [job, *job.siblings]  # n choices: admitted together
                in_use = self._rows_in_use()
                # More choices than rows: alone, decoding in groups of at most max_rows.
                if in_use + len(group) > self.max_rows and (in_use or len(group) == 1):
                    return
                starts = allocate_all(self.pool.allocator, group)
                if starts is None:
                    return  # the oldest waits for space; later ones wait behind it
                self._waiting.popleft()
            now = time.perf_counter()
            # The runner's prompt holds the crops from here on; the job keeps no copy.
            prompt = PromptPrefill.of(job.encoded, job.crops, starts[0], job.image_hashes)
            job.crops = None
            prompt.keep_embeds = self._will_recompute(job)
            row = Row(job, starts[0], sampler_for(job), now, prompt)
            row.followers = [
                Row(other, start, sampler_for(other), now, None)
                for other, start in zip(job.siblings, starts[1:], strict=True)
            ]
            self._prefilling.append(row)

    def _rows_in_use(self) -> int:
        waiting = sum(len(row.followers) for row in self._prefilling)
        return len(self._prefilling) + len(self._decoding) + waiting

    def _will_recompute(self, job: Job) -> bool:
        """Whether the job's sequence can first pass the switch while decoding: a prompt
        within it, and a budget that feeds a token at position `recompute_past`."""
        switch = self.recompute_past
        return switch is not None and job.encoded.prompt_tokens <= switch < (
            job.positions_needed - 1
        )

    def _recompute(self, row: Row, prompt_embeds: torch.Tensor) -> None:
        """The row's next fed token would be the first past the switch: back to prefill."""
        try:
            row.prompt = self.runner.regrown(
                row.job.encoded.input_ids, prompt_embeds, row.history, row.start
            )
        except VisionQueueError as error:
            self._fail(row, error)
            return
        row.prompt_embeds, row.history, row.recomputing = None, [], True
        self._decoding.remove(row)
        self._prefilling.append(row)
        # By admission: a request already streaming is not put behind later prompts.
        self._prefilling.sort(key=lambda r: r.admitted_at)

    def _prefill_unit(self, row: Row) -> None:
        prompt = row.prompt
        assert prompt is not None
        began = time.perf_counter()
        try:
            hidden = self.runner.prefill_unit(
                prompt,
                max_tokens=self.prefill_chunk_tokens,
                max_crops=self.vision_unit_crops,
            )
            if hidden is None:  # more units to come; the marker bounds the work queued
                self._in_flight.append(Launch([], self.runner.marker(), "prefill"))
                return
            row.prompt = None
            if not row.recomputing:
                row.cached_tokens, row.pinned = prompt.cached_tokens, prompt.pinned
            row.position = prompt.length
            row.kv_factors = self.runner.rope_factors(prompt.length)
            if prompt.keep_embeds:
                row.prompt_embeds, prompt.embeds = prompt.embeds, None
            with model_errors("prefill"):
                first = self.runner.launch_first_token(hidden, row.as_input())
        except VisionQueueError as error:
            self._fail(row, error)
            return
        finally:
            if not row.recomputing:  # a recompute's time is part of decoding
                row.prefill_s += time.perf_counter() - began
        self._prefilling.remove(row)
        self._decoding.append(row)
        self._launched(row)
        from_ = 0.0 if row.recomputing else time.perf_counter()
        self._in_flight.append(Launch([row], first, "prefill", from_))
        if row.recomputing:
            row.recomputing = False
            log.info(
                "LongRoPE switch: recomputed a row's %d positions with the %s factors in %.2fs",
                prompt.length, row.kv_factors, time.perf_counter() - began,
            )
        else:
            row.decode_began = time.perf_counter()
            self._start_followers(row, hidden)

    def _start_followers(self, row: Row, hidden: torch.Tensor) -> None:
        """`n` choices: each sibling's region becomes a copy of the prefilled one, and its
        first token is chosen from the same last hidden state by its own sampler."""
        followers, row.followers = row.followers, []
        for follower in followers:
            if follower.job.cancelled:
                self._finish(follower, "cancelled")
                continue
            try:
                with model_errors("prefill"):
                    self.runner.copy_region(row.start, follower.start, row.position)
                    first = self.runner.launch_first_token(hidden, follower.as_input())
            except VisionQueueError as error:
                self._fail(follower, error)
                continue
            follower.position, follower.kv_factors = row.position, row.kv_factors
            follower.prompt_embeds = row.prompt_embeds  # read only, by a recompute
            follower.prefill_s, follower.decode_began = row.prefill_s, row.decode_began
            self._decoding.append(follower)
            self._launched(follower)
            self._in_flight.append(Launch([follower], first, "prefill"))

    def _launched(self, row: Row) -> None:
        """The row's next token is chosen on the device: count it, move on a position."""
        row.launched += 1
        row.token = UNKNOWN_TOKEN

    def _decode_step(self) -> None:
        # Rows with budget left, and not about to cross the LongRoPE switch (they wait for
        # their last token on the host, then go back to prefill).
        rows = self._decodable()
        if any(row.awaits_token for row in rows):
            # A grammar's mask follows the row's last token: read what is in flight first.
            self._read(keep=0)
            rows = self._decodable()
        if not rows:
            return
        limit = self._decode_limit
        for index in range(0, len(rows), limit):
            self._decode_group(rows[index : index + limit])
        self.steps += 1

    def _decodable(self) -> list[Row]:
        switch = self.recompute_past
        return [
            row for row in self._decoding
            if row.launched < row.job.max_new_tokens
            and (row.position != switch or row.prompt_embeds is None)
        ]

    def _decode_group(self, rows: list[Row]) -> None:
        try:
            with model_errors("decoding"):
                if any(row.job.decode_fault for row in rows):
                    faults.allocate_impossibly(str(self.runner.device))
                tokens = self.runner.launch_decode([row.as_input() for row in rows])
        except ResourceExhausted as error:
            self.recover()
            if len(rows) == 1:
                self._fail(rows[0], error)
                return
            half = (len(rows) + 1) // 2
            self._decode_limit = max(1, min(self._decode_limit, half))
            log.warning(
                "out of memory decoding %d rows; decoding at most %d at a time",
                len(rows),
                self._decode_limit,
            )
            self._decode_group(rows[:half])
            self._decode_group(rows[half:])
            return
        except VisionQueueError as error:
            for row in rows:
                self._fail(row, error)
            return
        for row in rows:
            self._launched(row)
            row.position += 1
        self._in_flight.append(Launch(rows, tokens, "decoding"))

    def _deliver(self, row: Row, token: int, logprobs: RowLogprobs | None = None) -> None:
        row.generated += 1
        if row.generated == row.launched:  # no launched step has fed it on the device
            row.token = token
        if row.prompt_embeds is not None:
            row.history.append(token)
        row.job.events.put(Token(token, logprobs))
        if row.job.constraint is not None:
            row.job.constraint.advance(token)
        if token in self.stop_ids:
            self._finish(row, f"eos:{token}")
        elif row.generated >= row.job.max_new_tokens:
            self._finish(row, "length")
        elif (
            row.position == self.recompute_past
            and row.prompt_embeds is not None
            and row.generated == row.launched
        ):
            self._recompute(row, row.prompt_embeds)

    def _finish(self, row: Row, reason: str) -> None:
        self._release(row)
        for follower in row.followers:  # left before its prefill ended: they leave too
            self._finish(follower, reason)
        now = time.perf_counter()
        decode_s = now - row.decode_began if row.decode_began else 0.0
        wait_s = row.admitted_at - row.job.submitted_at
        row.job.events.put(
            Finished(reason, wait_s, row.prefill_s, decode_s, row.cached_tokens)
        )

    def _fail(self, row: Row, error: VisionQueueError) -> None:
        self._release(row)
        for follower in row.followers:
            self._fail(follower, error)
        row.job.events.put(Failed(error))
        if isinstance(error, ResourceExhausted):
            self.recover()

    def _release(self, row: Row) -> None:
        # Steps still in flight may write its region: they run before any later launch
        # (one stream), so the region is free for whatever is launched next.
        row.done = True
        for rows in (self._prefilling, self._decoding):
            if any(r is row for r in rows):
                rows.remove(row)
        pinned = row.prompt.pinned if row.prompt is not None else row.pinned
        self.runner.release(pinned)  # a cache entry it was served from
        row.pinned = None
        row.prompt = row.prompt_embeds = None  # its embeddings and image features, at once
        self.pool.allocator.free(row.start)

    def _fail_all(self, error: VisionQueueError) -> None:
        for row in [*self._prefilling, *self._decoding]:
            self._fail(row, error)
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in waiting:
            job.events.put(Failed(error))

