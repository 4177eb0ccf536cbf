"""How one step runs: a unit of a prompt's prefill, or one decode step over many rows.

The runner knows regions of a `KVPool`, prompts, positions and tokens, nothing of requests
(that is `worker.inference.scheduler`, which only decides what runs when).

Prefill (`prefill_unit`) owns the whole prompt, image tower included: a prompt's first
units each run a group of its image crops through the vision encoder (as vLLM's runner
runs its multimodal encoder before the decoder), then the features are projected and
written into the prompt's embeddings, then each unit runs a chunk of prompt positions
into the prompt's KV region. Units are bounded by the caller, so the decodes of other
rows wait for one unit, never for a whole long prompt.

Two decode paths share the model code:

* host path (CPU, and CUDA without flash): the rows' starts and lengths are host lists,
  attention runs per row over exactly its region ("rows" kernel).
* graph path (CUDA + flash): rows are written into static device buffers, padded to a
  batch-size bucket (1, 2, 4, 8, 16) with idle rows that write to and read from the pool's
  scratch slot, and the step is replayed as a CUDA graph captured per bucket. Attention
  is PyTorch's varlen flash kernel reading only each row's live slots. The same step also
  runs uncaptured on the CPU with the "gather" kernel, which is how its shared logic
  (bucketing, padding, buffers) is tested without a GPU.

Launching (`launch_decode`, `launch_first_token`, `marker`; worker.model.steps): the
scheduler's way in. On the graph path a step is queued and the call returns at once: the
inputs are staged through pinned memory, a row's input token still on the device (a
launched step chose it, nobody read it yet) is gathered there from where every launch
leaves each row's token, the graph is replayed, greedy rows take the argmax and sampled
rows are drawn by `sample_rows` on the device (host work: one uniform number per sampled
row), and the step's tokens are copied to the host behind it: one copy, read later.
Elsewhere (the host path, the CPU) a launch decodes and chooses synchronously, so
CPU tokens are exactly those of the synchronous engine.

Token choice (`chooser`, worker.model.token_choice): greedy rows take the argmax; sampled
rows use their own `TokenSampler`; with `row_independent` (CPU float32) a request's tokens
never depend on its batch neighbours. Rows that ask for logprobs get them from the same
step, computed on the device and copied with its tokens (`pack_logprobs`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from worker.model.config import RopeFactors
from worker.model.errors import is_out_of_memory, model_errors
from worker.model.image_cache import ImageCache
from worker.model.kvcache import DecodeRows, DecodeWriter, KVPool, PrefillWriter
from worker.model.modeling import Phi3VForCausalLM

# Re-exported: the scheduler and the tests name the prompt type beside the runner.
from worker.model.prompts import PromptPrefill as PromptPrefill
from worker.model.steps import (
    UNKNOWN_TOKEN,
    CudaTokens,
    DoneTokens,
    RowInput,
    RowLogprobs,
    StepBuffers,
    StepTokens,
    pack_logprobs,
    unpack_logprobs,
)
from worker.model.token_choice import TokenChooser

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16)


def graph_buckets(max_rows: int) -> tuple[int, ...]:
    """The batch sizes captured as graphs: the standard buckets up to max_rows, and max_rows."""
    chosen = [b for b in GRAPH_BUCKETS if b < max_rows]
    return (*chosen, max_rows)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    return next(b for b in buckets if b >= rows)


class ModelRunner:
    def __init__(
        self,
        model: Phi3VForCausalLM,
        pool: KVPool,
        *,
        device: torch.device,
        kernel: str,
        decode_kernel: str,
        row_independent: bool,
        max_rows: int,
        window: int,
        graphs: bool,
        compile: bool = False,
        compile_backend: str = "inductor",
        image_cache: ImageCache | None = None,
    ) -> None:
        self.model = model
        self.image_cache = image_cache if image_cache is not None else ImageCache(0)
        self.pool = pool
        self.device = device
        self.kernel = kernel
        self.decode_kernel = decode_kernel
        self.row_independent = row_independent
        self.max_rows = max_rows
        self.window = window  # longest region a row may have: the graph's key length
        # The graph path needs a kernel without host lengths.
        self.graph_path = graphs or decode_kernel != "rows"
        self.capture = graphs and device.type == "cuda"
        self.compile = compile and self.graph_path
        self.compile_backend = compile_backend
        model.set_row_independent(row_independent)
        self.buckets = graph_buckets(max_rows)
        self._buffers = StepBuffers(max_rows, pool.scratch_slot, device)
        self.chooser = TokenChooser(
            model.logits, model.lm_head.weight, row_independent, self._buffers.staged
        )
        self._step: Callable[[int], torch.Tensor] = self._graph_step
        if self.compile:
            self._step = torch.compile(
                self._graph_step, fullgraph=True, dynamic=False, backend=compile_backend
            )
        self._graphs: dict[int, tuple[Any, torch.Tensor]] = {}

    # Prefill ------------------------------------------------------------------------------

    def prefill_unit(
        self,
        prompt: PromptPrefill,
        *,
        max_tokens: int | None = None,
        max_crops: int | None = None,
    ) -> torch.Tensor | None:
        """Run the prompt's next unit; its last position's hidden state [1, hidden] once the
        whole prompt is in its region, else None.

        A unit is at most `max_crops` crops through the image tower, or (once the prompt's
        embeddings are complete) at most `max_tokens` positions; None = all that is left.
        """
        if prompt.embeds is None and prompt.offset == 0 and not prompt.crops_encoded:
            self._reuse_prefix(prompt)
        if prompt.embeds is None and not self.encode_unit(prompt, max_crops):
            return None
        embeds = prompt.embeds
        assert embeds is not None
        length = prompt.length
        end = length if max_tokens is None else min(length, prompt.offset + max_tokens)
        if prompt.offset < prompt.prefix_length:
            end = min(end, prompt.prefix_length)  # the image prefix: a unit of its own
        with model_errors("prefill"):
            chunk = embeds[:, prompt.offset - prompt.embeds_from : end - prompt.embeds_from]
            hidden = self.prefill(prompt.start, chunk, prompt.offset, length)
        prompt.offset = end
        if end == prompt.prefix_length and not prompt.cached_tokens:
            self._keep_prefix(prompt)
        if end < length:
            return None
        if not prompt.keep_embeds:
            prompt.embeds = None  # the region holds the prompt now
        return hidden

    def _prefix_key(self, prompt: PromptPrefill) -> Hashable | None:
        """The cache key of the prompt's image prefix; None when it has none to share."""
        if not (self.image_cache.enabled and prompt.prefix_length and prompt.image_hashes):
            return None
        return (
            tuple(prompt.input_ids[: prompt.prefix_length]),
            prompt.image_hashes,
            str(self.pool.keys[0].dtype),
            self.rope_factors(prompt.length),  # the whole prompt's, as its keys were rotated
        )

    def _reuse_prefix(self, prompt: PromptPrefill) -> None:
        """On a hit, copy the prefix's KV into the prompt's region and skip its image tower:
        only the positions after it are embedded (text) and prefilled."""
        key = self._prefix_key(prompt)
        if key is None or prompt.keep_embeds:  # a recompute needs the image embeddings
            return
        saved = self.image_cache.get("prefix", key, pin=True)
        if saved is None:
            return
        prompt.pinned = key
        begin = prompt.prefix_length
        with model_errors("prefill"):
            self.pool.write_prefix(prompt.start, saved)
            ids = self._buffers.staged(torch.tensor([prompt.input_ids[begin:]]))
            prompt.embeds = self.model.model.vision_embed_tokens.wte(ids)
        prompt.offset = prompt.embeds_from = prompt.cached_tokens = begin
        prompt.crops = None

    def _keep_prefix(self, prompt: PromptPrefill) -> None:
        """The region now holds the image prefix, computed as a unit of its own: cache it."""
        key = self._prefix_key(prompt)
        if key is None or key in self.image_cache:
            return
        with model_errors("prefill"):
            saved = self.pool.read_prefix(prompt.start, prompt.prefix_length)
        self.image_cache.put("prefix", key, saved, saved.nbytes)

    def copy_region(self, source: int, target: int, length: int) -> None:
        self.pool.copy_region(source, target, length)

    def release(self, prompt_pin: Hashable | None) -> None:
        """A row served from a cached prefix left: its entry may be evicted again."""
        if prompt_pin is not None:
            self.image_cache.unpin(prompt_pin)

    def regrown(
        self,
        input_ids: Sequence[int],
        prompt_embeds: torch.Tensor,
        generated: Sequence[int],
        start: int,
    ) -> PromptPrefill:
        """The whole sequence so far as a new prompt for the same region: Phi-3.5's
        recompute at the LongRoPE switch (docs/model.md).

        Its embeddings are the first prefill's (image features included: the same
        numbers the reference recomputes from the same pixels, without a second pass of
        the image tower) followed by the generated tokens' embeddings; prefilled like any
        prompt, it is rotated with the factors of its whole length, the long ones.
        """
        with model_errors("prefill"):
            tokens = self._buffers.staged(torch.tensor([list(generated)]))
            embeds = torch.cat([prompt_embeds, self.model.embed_tokens(tokens)], dim=1)
        return PromptPrefill(input_ids=[*input_ids, *generated], start=start, embeds=embeds)

    def rope_factors(self, length: int) -> RopeFactors:
        """The factor set a prefill of `length` positions writes its keys with."""
        return self.model.config.rope.factors_for(length)

    def encode_unit(self, prompt: PromptPrefill, max_crops: int | None = None) -> bool:
        """One unit of the prompt's image tower; True once `prompt.embeds` is complete.

        The unit that encodes the last crops returns False: the projection (small next to
        a group of crops) is left to the next call, which `prefill_unit` follows with the
        first chunk, so the tower's groups and the prompt's chunks are one step each.
        """
        vision = self.model.model.vision_embed_tokens
        with model_errors("image encoding"):
            crops = prompt.crops
            if crops is not None and prompt.crops_encoded < int(crops.shape[0]):
                unit = max_crops or int(crops.shape[0])
                group = crops[prompt.crops_encoded : prompt.crops_encoded + unit]
                prompt.features.append(vision.crop_features(group))
                prompt.crops_encoded += int(group.shape[0])
                return False
            features, prompt.features, prompt.crops = prompt.features, [], None
            projected = vision.project(torch.cat(features), prompt.grids) if features else []
            del features  # every crop's CLIP features: gone before the embeddings exist
            input_ids = self._buffers.staged(torch.tensor([prompt.input_ids]))
            prompt.embeds = vision.place(input_ids, projected, prompt.spans)
        return True

    def prefill(self, start: int, embeds: torch.Tensor, offset: int, total: int) -> torch.Tensor:
        """Run prompt positions [offset, offset + n) of a `total`-token prompt; [1, hidden].

        LongRoPE's choice for every chunk is that of the whole prompt (`total`), which the
        reference prefilled in one forward call.
        """
        n = int(embeds.shape[1])
        positions = torch.arange(offset, offset + n, device=self.device).unsqueeze(0)
        # Staged: a plain host-to-device copy would wait for every step queued before it.
        extent = self._buffers.staged(torch.tensor([total]))
        mask, causal = None, True
        if offset and self.kernel != "flash_attention_2":
            # Bottom-right causal: query i sees the offset cached keys and keys <= i.
            allowed = torch.ones(n, offset + n, dtype=torch.bool, device=self.device)
            mask, causal = allowed.tril(offset).view(1, 1, n, offset + n), False
        return self.model.last_hidden(
            embeds,
            positions,
            PrefillWriter(self.pool, start, offset),
            attention_mask=mask,
            kernel=self.kernel,
            causal=causal,
            rope_extent=extent,
        )

    # Launching ----------------------------------------------------------------------------

    def launch_decode(self, batch: Sequence[RowInput]) -> StepTokens:
        """Queue one decode step for every row; its tokens, to read later (worker.model.steps)."""
        if not self.graph_path:
            known = self._known(batch)
            if any(row.top_logprobs is not None for row in known):
                tokens, logprobs = self.decode_with_logprobs(known)
            else:
                tokens, logprobs = self.decode(known), None
            self._remember(batch, tokens)
            return DoneTokens(tokens, logprobs)
        logits = self._decode_graphed(batch)
        chosen = self.chooser.on_device(logits, batch)
        self._buffers.last[self._buffers.starts[: len(batch)].long()] = chosen
        return self._handle(chosen, logits, batch)

    def launch_first_token(self, hidden: torch.Tensor, row: RowInput) -> StepTokens:
        """The token a finished prefill chooses (`prefill_unit`'s hidden state), queued."""
        if self.device.type != "cuda":
            tokens, logprobs = self.chooser.choose_with_logprobs(hidden, [row])
            self._remember([row], tokens)
            return DoneTokens(tokens, logprobs)
        logits = self.model.logits(hidden)
        chosen = self.chooser.on_device(logits, [row])
        self._buffers.last[row.start] = chosen[0]
        return self._handle(chosen, logits, [row])

    def marker(self) -> StepTokens:
        """Done when everything launched so far is (a prefill unit that chose no token)."""
        return CudaTokens(None) if self.device.type == "cuda" else DoneTokens([])

    def _handle(
        self, chosen: torch.Tensor, logits: torch.Tensor, batch: Sequence[RowInput]
    ) -> StepTokens:
        """The step's tokens, with the asking rows' logprobs in the same copy."""
        asks = None
        if any(row.top_logprobs is not None for row in batch):
            chosen, asks = pack_logprobs(chosen, logits, batch, self._buffers.staged)
        if self.device.type == "cuda":
            return CudaTokens(chosen, asks)
        if asks is None:
            return DoneTokens(chosen.tolist())
        values = chosen.tolist()
        return DoneTokens(
            [int(row[0]) for row in values], unpack_logprobs([r[1:] for r in values], asks)
        )

    def _known(self, batch: Sequence[RowInput]) -> Sequence[RowInput]:
        """The batch with every row's token on the host (the synchronous path)."""
        if all(row.token != UNKNOWN_TOKEN for row in batch):
            return batch
        last = self._buffers.last
        return [
            row if row.token != UNKNOWN_TOKEN
            else dataclasses.replace(row, token=int(last[row.start]))
            for row in batch
        ]

    def _remember(self, batch: Sequence[RowInput], tokens: Sequence[int]) -> None:
        starts = torch.tensor([row.start for row in batch])
        self._buffers.last[starts.to(self.device)] = torch.tensor(tokens, device=self.device)

    # Decode -------------------------------------------------------------------------------

    def decode(self, batch: Sequence[RowInput]) -> list[int]:
        """One step for every row; returns each row's next token."""
        return self.decode_with_logprobs(batch)[0]

    def decode_with_logprobs(
        self, batch: Sequence[RowInput]
    ) -> tuple[list[int], list[RowLogprobs | None]]:
        """`decode`, and the logprobs of the rows that ask."""
        if self.graph_path:
            logits = self._decode_graphed(batch)
            return self.chooser.choose_with_logprobs(None, batch, logits)
        hidden = self._decode_host(batch)
        return self.chooser.choose_with_logprobs(hidden, batch)

    def _decode_host(self, batch: Sequence[RowInput]) -> torch.Tensor:
        size = len(batch)
        tokens = torch.tensor([r.token for r in batch], device=self.device).view(size, 1)
        positions = torch.tensor([r.position for r in batch], device=self.device).view(size, 1)
        slots = torch.tensor([r.start + r.position for r in batch], device=self.device)
        rows = DecodeRows(
            tokens_first=self.pool.tokens_first,
            window=self.window,
            starts=[r.start for r in batch],
            used=[r.position + 1 for r in batch],
        )
        return self.model.last_hidden(
            self.model.embed_tokens(tokens),
            positions,
            DecodeWriter(self.pool, slots),
            kernel=self.kernel,
            rows=rows,
            decode_kernel=self.decode_kernel,
        )

    def _decode_graphed(self, batch: Sequence[RowInput]) -> torch.Tensor:
        bucket = bucket_for(len(batch), self.buckets)
        self._buffers.fill(batch, bucket)
        captured = self._graphs.get(bucket)
        if captured is not None:
            graph, logits = captured
            graph.replay()
        else:
            logits = self._run_step(bucket)
        return logits[: len(batch)]

    def _graph_step(self, bucket: int) -> torch.Tensor:
        """The decode step over the static buffers' first `bucket` rows: logits [bucket, V]."""
        b = self._buffers
        rows = DecodeRows(
            tokens_first=self.pool.tokens_first,
            window=self.window,
            starts_t=b.starts[:bucket],
            used_t=b.used[:bucket],
        )
        hidden = self.model.last_hidden(
            self.model.embed_tokens(b.tokens[:bucket].view(bucket, 1)),
            b.positions[:bucket].view(bucket, 1),
            DecodeWriter(self.pool, b.slots[:bucket]),
            kernel=self.kernel,
            rows=rows,
            decode_kernel=self.decode_kernel,
        )
        return self.model.logits(hidden)

    def _run_step(self, bucket: int) -> torch.Tensor:
        try:
            return self._step(bucket)
        except Exception as exc:
            if not self.compile or is_out_of_memory(exc):
                raise
            # A compiler that cannot handle this platform must not take the worker
            # down: fall back to the same step, uncompiled, for good.
            log.warning(
                "compiled decode failed (%s: %s); decoding uncompiled from now on",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            self.compile = False
            self._step = self._graph_step
            return self._step(bucket)

    def capture_graphs(self) -> None:
        """CUDA: record the decode step of every bucket (worker warmup), largest first."""
        if not self.capture or self._graphs:
            return
        memory_pool = torch.cuda.graph_pool_handle()
        for bucket in sorted(self.buckets, reverse=True):
            self._buffers.fill((), bucket)  # all rows idle: scratch slot only
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles, and lets lazy initialisation happen
                    self._run_step(bucket)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                logits = self._step(bucket)
            self._graphs[bucket] = (graph, logits)
        log.info("decode CUDA graphs captured for batch sizes %s", self.buckets)
