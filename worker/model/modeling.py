"""Phi-3-vision's language model from Phi-3 decoder layers (`layers`, transformers' design).

The layers (fused `qkv_proj`, `gate_up_proj`, RMSNorm) are `layers.Phi3DecoderLayer`s,
drop-ins for transformers' class; around them this module keeps three things of its own:

* `LongRopeRotary`: picks short or long factors per forward call from the positions,
  as a tensor operation. transformers' rotary instead re-registers its `inv_freq` buffer
  on every call (state mutated in the request path, and a data-dependent branch that
  breaks a compiled graph).
* the attention function (`attention.phi3v_attention`), registered with the layers'
  `AttentionInterface` under `ATTENTION_NAME` and steered per call by keyword arguments
  that the decoder layers pass through (`kernel`, `causal`, `rows`, `decode_kernel`).
* the forward loop, which returns only the last position's hidden state or logits: a
  4,000-token prompt never materialises 4,000 x 32,064 logits.

The decoder layers' linear maps are `RowIndependentLinear`s: with `row_independent` on,
a decode step of B rows computes each row with the kernel a single row uses (one batched
matrix-vector product per row), so a row's numbers never depend on its batch neighbours.
On the CPU, batched float32 GEMMs round differently from the single-row GEMV (measured:
rows differ in the last bits depending on batch size and position), which could flip a
greedy token where two logits nearly tie.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from worker.model.attention import phi3v_attention
from worker.model.config import Phi3VConfig, RopeConfig
from worker.model.layers import (
    AttentionInterface,
    Phi3Config,
    Phi3DecoderLayer,
    Phi3RMSNorm,
    uninitialized_embedding,
)
from worker.model.vision import ImageEmbedding

__all__ = ["ATTENTION_NAME", "KERNELS", "LongRopeRotary", "Phi3VForCausalLM", "phi3v_attention"]

ATTENTION_NAME = "vision_queue_phi3v"
KERNELS = ("sdpa", "eager", "flash_attention_2")


class RowIndependentLinear(nn.Linear):
    """nn.Linear that can compute the rows of a [B, 1, in] decode batch one by one."""

    row_independent = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_independent and x.dim() == 3 and x.shape[1] == 1 and x.shape[0] > 1:
            # bmm of [1, in] x [in, out] per row: the same kernel, and so the same bits, as
            # the single-row F.linear (checked in tests/worker/model/test_modeling.py).
            weight = self.weight.t().unsqueeze(0).expand(x.shape[0], -1, -1)
            out = torch.bmm(x, weight)
            return out if self.bias is None else out + self.bias
        return nn.functional.linear(x, self.weight, self.bias)


def _row_independent_linears(layer: nn.Module) -> list[RowIndependentLinear]:
    """Swap the layer's nn.Linear children for RowIndependentLinear (same names, same shapes)."""
    swapped = []
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                replacement = RowIndependentLinear(
                    child.in_features, child.out_features, bias=child.bias is not None,
                    device=child.weight.device, dtype=child.weight.dtype,
                )
                setattr(parent, name, replacement)
                swapped.append(replacement)
    return swapped


class LongRopeRotary(nn.Module):
    """cos/sin for LongRoPE; stateless, so one module serves any number of requests."""

    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.rope = rope
        self.original_max_positions = rope.original_max_positions
        self.attention_scaling = rope.attention_scaling
        self.short_inv_freq: torch.Tensor
        self.long_inv_freq: torch.Tensor
        # Computed on the CPU even inside a meta-device build: arithmetic on meta tensors
        # runs torch's Python reference kernels, which import torch._dynamo and sympy.
        self.reset_buffers(torch.device("cpu"))

    def reset_buffers(self, device: torch.device | None) -> None:
        rope = self.rope
        exponents = torch.arange(0, rope.head_dim, 2, dtype=torch.int64, device=device).float()
        base = rope.theta ** (exponents / rope.head_dim)
        for name, factors in (
            ("short_inv_freq", rope.short_factor),
            ("long_inv_freq", rope.long_factor),
        ):
            ext = torch.tensor(factors, dtype=torch.float32, device=device)
            self.register_buffer(name, 1.0 / (ext * base), persistent=False)

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, extent: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for [B, S] positions; row b uses long factors iff extent[b] > original.

        `extent` is the length of the sequence row b's forward call covers in the
        reference: the furthest position + 1 (the default), or the whole prompt's length
        for a chunk of a prompt that the reference prefilled in one call. Decided per row
        and per call, so a row past the limit switches while its cached keys keep their
        short-factor rotation, as Phi-3-vision's code does, whatever the other rows do.
        (Under Phi-3.5's recompute the scheduler prefills such a row again first, so it
        has no short-rotated keys left by then.)
        """
        if extent is None:
            extent = position_ids.amax(dim=-1) + 1
        use_long = (extent > self.original_max_positions).view(-1, 1, 1)
        inv_freq = torch.where(use_long, self.long_inv_freq, self.short_inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def text_config(config: Phi3VConfig) -> Phi3Config:
    """The sizes `Phi3DecoderLayer` reads; the rotary embedding is handled outside the layers."""
    text = Phi3Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        rms_norm_eps=config.rms_norm_eps,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.rope.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope.theta},
        pad_token_id=None,
    )
    AttentionInterface.register(ATTENTION_NAME, phi3v_attention)
    text._attn_implementation = ATTENTION_NAME
    return text


class Phi3VModel(nn.Module):
    """`model.*` of the checkpoint: embeddings, image embedding, decoder layers, final norm."""

    def __init__(self, config: Phi3VConfig, vision_attention: str) -> None:
        super().__init__()
        text = text_config(config)
        self.embed_tokens = uninitialized_embedding(config.vocab_size, config.hidden_size)
        self.vision_embed_tokens = ImageEmbedding(config, self.embed_tokens, vision_attention)
        self.layers = nn.ModuleList(
            [Phi3DecoderLayer(text, index) for index in range(config.num_hidden_layers)]
        )
        self.row_linears = [lin for layer in self.layers for lin in _row_independent_linears(layer)]
        self.norm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = LongRopeRotary(config.rope)


class Phi3VForCausalLM(nn.Module):
    def __init__(self, config: Phi3VConfig, vision_attention: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.model = Phi3VModel(config, vision_attention)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        **options: Any,
    ) -> torch.Tensor:
        """Logits of the last position, [B, vocab] float32. See `last_hidden` for options."""
        return self.logits(self.last_hidden(inputs_embeds, position_ids, cache, **options))

    def last_hidden(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        *,
        attention_mask: torch.Tensor | None = None,
        kernel: str = "sdpa",
        causal: bool = False,
        rope_extent: torch.Tensor | None = None,
        rows: Any = None,
        decode_kernel: str = "rows",
    ) -> torch.Tensor:
        """Final-norm hidden state of the last position, [B, hidden].

        `cache` has `update()` (kvcache); `rows` (kvcache.DecodeRows) marks a batched
        decode step over a KV pool, read with `decode_kernel`.
        """
        cos_sin = self.model.rotary(position_ids, inputs_embeds.dtype, rope_extent)
        hidden = inputs_embeds
        for layer in self.model.layers:
            out = layer(
                hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_embeddings=cos_sin,
                kernel=kernel,
                causal=causal,
                rows=rows,
                decode_kernel=decode_kernel,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        last: torch.Tensor = self.model.norm(hidden[:, -1])
        return last

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(hidden).float()
        return logits

    def set_row_independent(self, enabled: bool) -> None:
        for linear in self.model.row_linears:
            linear.row_independent = enabled

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        embeds: torch.Tensor = self.model.embed_tokens(token_ids)
        return embeds

    def reset_buffers(self, device: torch.device) -> None:
        """Rebuild the non-persistent buffers, which a meta-device build leaves empty."""
        self.model.rotary.reset_buffers(device)
        self.model.vision_embed_tokens.img_processor.reset_buffers(device)


def build_model(config: Phi3VConfig, vision_attention: str = "sdpa") -> Phi3VForCausalLM:
    """The module tree on the meta device: no memory and no random init until weights arrive."""
    with torch.device("meta"):
        return Phi3VForCausalLM(config, vision_attention)
