"""Phi-3-vision's language model from transformers' Phi-3 decoder layers.

The layers (fused `qkv_proj`, `gate_up_proj`, RMSNorm) are transformers' own
`Phi3DecoderLayer`s; around them this module keeps three things of its own:

* `LongRopeRotary`: picks short or long factors per forward call from the positions,
  as a tensor operation. transformers' rotary instead re-registers its `inv_freq` buffer
  on every call (state mutated in the request path, and a data-dependent branch that
  breaks a compiled graph).
* the attention function, registered with transformers' `AttentionInterface` under
  `ATTENTION_NAME` and steered per call by two keyword arguments that the decoder layers
  pass through: `kernel` (sdpa | eager | flash_attention_2) and `causal`.
* the forward loop, which returns only the last position's logits: a 4,000-token prompt
  never materialises 4,000 x 32,064 logits.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, Phi3Config
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RMSNorm

from worker.model.config import Phi3VConfig, RopeConfig
from worker.model.vision import ImageEmbedding

ATTENTION_NAME = "vision_queue_phi3v"
KERNELS = ("sdpa", "eager", "flash_attention_2")


def phi3v_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    kernel: str = "sdpa",
    causal: bool = False,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """[B, H, q, D] x [B, Hkv, k, D] -> [B, q, H, D].

    `causal` is only used when q == k (a prompt from an empty cache); a boolean
    `attention_mask` (True = attend) covers decoding over a static cache.
    """
    if kernel == "flash_attention_2":
        # Optional dependency, checked at load (engine.flash_attention_support).
        flash_attn_func = importlib.import_module("flash_attn").flash_attn_func
        out = flash_attn_func(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            softmax_scale=scaling, causal=causal,
        )
        return out, None
    groups = query.shape[1] // key.shape[1]
    if kernel == "eager":
        if groups > 1:
            key = key.repeat_interleave(groups, dim=1)
            value = value.repeat_interleave(groups, dim=1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(2, 3)) * scale
        if causal:
            q_len, k_len = scores.shape[-2:]
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device)
            scores = scores.masked_fill(~allowed.tril(k_len - q_len), float("-inf"))
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value)
    else:
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask,
            is_causal=causal and attention_mask is None, scale=scaling, enable_gqa=groups > 1,
        )
    return out.transpose(1, 2).contiguous(), None


class LongRopeRotary(nn.Module):
    """cos/sin for LongRoPE; stateless, so one module serves any number of requests."""

    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.rope = rope
        self.original_max_positions = rope.original_max_positions
        self.attention_scaling = rope.attention_scaling
        self.short_inv_freq: torch.Tensor
        self.long_inv_freq: torch.Tensor
        self.reset_buffers(None)

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
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Long factors iff the furthest position in this call lies beyond the original
        # context; decided per call, so a decode step past the limit switches while the
        # keys already cached keep their short-factor rotation (as the reference does).
        use_long = position_ids.max() + 1 > self.original_max_positions
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
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.vision_embed_tokens = ImageEmbedding(config, self.embed_tokens, vision_attention)
        self.layers = nn.ModuleList(
            [Phi3DecoderLayer(text, index) for index in range(config.num_hidden_layers)]
        )
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
        *,
        attention_mask: torch.Tensor | None = None,
        kernel: str = "sdpa",
        causal: bool = False,
    ) -> torch.Tensor:
        """Logits of the last position, [B, vocab] float32. `cache` has `update()` (kvcache)."""
        cos_sin = self.model.rotary(position_ids, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.model.layers:
            out = layer(
                hidden,
                attention_mask=attention_mask,
                past_key_values=cache,
                position_embeddings=cos_sin,
                kernel=kernel,
                causal=causal,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        last = self.model.norm(hidden[:, -1:])
        logits: torch.Tensor = self.lm_head(last)[:, -1].float()
        return logits

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
