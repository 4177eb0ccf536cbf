"""The Phi-3 decoder layer and the CLIP vision encoder, in plain torch.

Drop-in for the transformers classes of the same names (constructor arguments, parameter
names, call conventions, numerics), so `modeling` and `vision` read as before and the
official checkpoint loads unchanged. Why not transformers' own: any of its model classes
imports `transformers.modeling_utils`, which pulls quantizers, distributed tensors,
dynamo and sympy, about 3 s of a 7 s one-shot `worker infer` on CPU. These modules need
torch only. tests/worker/model/test_layers.py checks them against transformers' classes
on random weights, and test_reference.py against Microsoft's implementation.

* `AttentionInterface`: named attention functions (`register(name, fn)`); a config's
  `_attn_implementation` picks one, "eager" and "sdpa" are built in. A function takes
  (module, query, key, value, attention_mask, *, scaling, dropout, **kwargs) with
  [B, heads, L, head_dim] tensors and returns ([B, L, heads, head_dim], weights | None).
  Keyword arguments given to a layer's forward reach the function unchanged.
* `Phi3DecoderLayer`: pre-norm attention (fused `qkv_proj`, rotary from the caller's
  `position_embeddings`, keys and values through `cache.update(key, value, layer_idx)`)
  and a gated MLP (fused `gate_up_proj`), both residual.
* `CLIPVisionModel`: embeddings (class token, patches, learned positions), `pre_layrnorm`,
  `encoder.layers`, `post_layernorm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

AttentionFunction = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax(QK^T * scale + mask) V, the softmax in float32; an additive float mask."""
    key, value = _expand_kv(query, key), _expand_kv(query, value)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """torch's scaled_dot_product_attention; causal only for decoder attention without a mask."""
    key, value = _expand_kv(query, key), _expand_kv(query, value)
    q_len, k_len = query.shape[2], key.shape[2]
    causal = getattr(module, "is_causal", False) and attention_mask is None and q_len > 1
    if causal and k_len != q_len:  # new queries after cached keys: mask the future explicitly
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
        attention_mask, causal = allowed.tril(k_len - q_len), False
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=bool(causal),
    )
    return out.transpose(1, 2).contiguous(), None


def _expand_kv(query: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    groups = query.shape[1] // states.shape[1]
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


class AttentionInterface:
    """The registry of attention functions, by the name a config's `_attn_implementation` holds."""

    _functions: ClassVar[dict[str, AttentionFunction]] = {
        "eager": eager_attention,
        "sdpa": sdpa_attention,
    }

    @classmethod
    def register(cls, name: str, function: AttentionFunction) -> None:
        cls._functions[name] = function

    @classmethod
    def get(cls, name: str) -> AttentionFunction:
        try:
            return cls._functions[name]
        except KeyError:
            known = ", ".join(sorted(cls._functions))
            raise ValueError(f"unknown attention implementation {name!r} ({known})") from None


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": nn.functional.silu,
    "gelu": nn.functional.gelu,
    "quick_gelu": _quick_gelu,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r} ({', '.join(_ACTIVATIONS)})") from None


def uninitialized_embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """An `nn.Embedding` whose table is left as allocated, for weights loaded afterwards.

    Built on the meta device, `nn.Embedding`'s random init goes through torch's Python
    reference kernels, whose first call imports `torch._dynamo` (about as long as importing
    torch itself) in a process that never compiles anything on CPU.
    """
    table = torch.empty(num_embeddings, embedding_dim)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=table)


# Phi-3 --------------------------------------------------------------------------------------


class Phi3Config:
    """The sizes a `Phi3DecoderLayer` reads (rotary embedding handled by the caller)."""

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        intermediate_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        num_key_value_heads: int | None = None,
        rms_norm_eps: float = 1e-5,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        rope_parameters: dict[str, Any] | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = dict(rope_parameters or {})
        self.pad_token_id = pad_token_id
        self._attn_implementation = "sdpa"


class Phi3RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and returned in the input's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out: torch.Tensor = self.weight * x.to(dtype)
        return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """[B, heads, L, D] rotated by [B, L, R] cos/sin on its first R dimensions."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    width = cos.shape[-1]
    rotated, passed = states[..., :width], states[..., width:]
    return torch.cat([rotated * cos + _rotate_half(rotated) * sin, passed], dim=-1)


class Phi3Attention(nn.Module):
    is_causal = True

    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.query_width = config.num_attention_heads * self.head_dim
        self.kv_width = config.num_key_value_heads * self.head_dim
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.query_width + 2 * self.kv_width, bias=False
        )
        self.o_proj = nn.Linear(self.query_width, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = self.qkv_proj(hidden_states).split(
            [self.query_width, self.kv_width, self.kv_width], dim=-1
        )
        query = query.view(shape).transpose(1, 2)
        key = key.view(shape).transpose(1, 2)
        value = value.view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attend = AttentionInterface.get(self.config._attn_implementation)
        out, _ = attend(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs
        )
        result: torch.Tensor = self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))
        return result


class Phi3MLP(nn.Module):
    def __init__(self, config: Phi3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation_fn = activation(config.hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        out: torch.Tensor = self.down_proj(up * self.activation_fn(gate))
        return out


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: Phi3Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Phi3Attention(config, layer_idx)
        self.mlp = Phi3MLP(config)
        self.input_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Phi3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Any = None,
        past_key_values: Any = None,  # transformers' older name for `cache`
        **kwargs: Any,
    ) -> torch.Tensor:
        """[B, L, hidden] -> [B, L, hidden]; other keywords reach the attention function."""
        attended = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            attention_mask,
            cache if cache is not None else past_key_values,
            **kwargs,
        )
        hidden_states = hidden_states + attended
        result: torch.Tensor = hidden_states + self.mlp(
            self.post_attention_layernorm(hidden_states)
        )
        return result


# CLIP ---------------------------------------------------------------------------------------


class CLIPVisionConfig:
    def __init__(
        self,
        *,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 32,
        projection_dim: int = 512,
        hidden_act: str = "quick_gelu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.projection_dim = projection_dim  # unused by the vision tower; kept for parity
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self._attn_implementation = "sdpa"


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size,
            kernel_size=config.patch_size, stride=config.patch_size, bias=False,
        )
        self.num_positions = (config.image_size // config.patch_size) ** 2 + 1
        self.position_embedding = uninitialized_embedding(self.num_positions, config.hidden_size)
        self.position_ids: torch.Tensor
        # Made on the CPU, then moved: arange on the meta device would import torch._dynamo.
        ids = torch.arange(self.num_positions, device="cpu").expand((1, -1))
        self.register_buffer("position_ids", ids.to(torch.get_default_device()), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] -> [B, 1 + patches, hidden]; S must be the configured image size."""
        batch, _, height, width = pixel_values.shape
        if height != self.image_size or width != self.image_size:
            raise ValueError(
                f"image crops are {height}x{width}, the vision tower takes "
                f"{self.image_size}x{self.image_size}"
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        classes = self.class_embedding.expand(batch, 1, -1)
        embeddings = torch.cat([classes, patches], dim=1)
        out: torch.Tensor = embeddings + self.position_embedding(self.position_ids)
        return out


class CLIPAttention(nn.Module):
    is_causal = False

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        width = config.hidden_size
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attend = AttentionInterface.get(self.config._attn_implementation)
        out, _ = attend(self, query, key, value, attention_mask, scaling=self.scale, dropout=0.0)
        result: torch.Tensor = self.out_proj(out.reshape(*hidden_states.shape[:-1], -1))
        return result


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.activation_fn = activation(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.activation_fn(self.fc1(hidden_states)))
        return out


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.layer_norm1(hidden_states), attention_mask
        )
        result: torch.Tensor = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return result


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]
        )


class CLIPVisionModel(nn.Module):
    """The vision transformer; callers run `embeddings`, `pre_layrnorm` and `encoder.layers`."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The embedding output then every layer's output (transformers' `hidden_states`)."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [hidden]
        for layer in self.encoder.layers:
            hidden = layer(hidden)
            states.append(hidden)
        return states


__all__ = [
    "AttentionInterface",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "Phi3Config",
    "Phi3DecoderLayer",
    "Phi3RMSNorm",
    "uninitialized_embedding",
]
