"""The attention function the decoder layers call, and the decode kernels over a KV pool.

`phi3v_attention` is registered with the layers' `AttentionInterface` and steered per
call by keyword arguments the decoder layers pass through: `kernel` (sdpa | eager |
flash_attention_2), `causal`, and, for a batched decode step, `rows` (`DecodeRows`).

Decode kernels (`rows.kernel` decides nothing; the caller picks one by `decode_kernel`):

* "rows": one attention call per row over exactly its live region (a view, no copy). The
  per-row math is the single-request math, bit for bit, whatever else is in the batch:
  the CPU default, and what float32 exactness rests on.
* "gather": tensors only (no host lengths), so it can sit inside a CUDA graph: every row
  reads a fixed window of slots from its start, masked past its length. Masked slots
  get -inf scores and zeroed values, so they contribute exact zeros. Also the reference
  the "varlen" kernel is checked against at start-up.
* "varlen": PyTorch's flash varlen kernel with `seqused_k`: reads only each row's live
  slots (CUDA, bfloat16/float16).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from worker.model.kvcache import DecodeRows, layer_view


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
    rows: DecodeRows | None = None,
    decode_kernel: str = "rows",
    **_: Any,
) -> tuple[torch.Tensor, None]:
    """[B, H, q, D] x [B, Hkv, k, D] -> [B, q, H, D].

    `causal` without a mask is only used when q == k (a prompt from an empty cache), or
    with flash (bottom-right aligned); a boolean `attention_mask` (True = attend) covers
    the rest. With `rows`, key/value are a whole layer of a `KVPool`.
    """
    if rows is not None:
        return decode_attention(query, key, value, rows, scaling, kernel, decode_kernel), None
    if kernel == "flash_attention_2":
        # Optional dependency, checked at load (engine_setup.flash_attention_support).
        flash_attn_func = importlib.import_module("flash_attn").flash_attn_func
        out = flash_attn_func(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            softmax_scale=scaling,
            causal=causal,
        )
        return out, None
    return dense_attention(query, key, value, attention_mask, scaling, kernel, causal), None


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    kernel: str,
    causal: bool,
) -> torch.Tensor:
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
            query,
            key,
            value,
            attn_mask=attention_mask,
            is_causal=causal and attention_mask is None,
            scale=scaling,
            enable_gqa=groups > 1,
        )
    return out.transpose(1, 2).contiguous()


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: DecodeRows,
    scaling: float | None,
    kernel: str,
    decode_kernel: str,
) -> torch.Tensor:
    """One query per row, [B, H, 1, D], over each row's region of a pool layer."""
    if decode_kernel == "rows":
        return _per_row(query, keys, values, rows, scaling, kernel)
    if decode_kernel == "gather":
        return _gathered(query, keys, values, rows, scaling)
    if decode_kernel == "varlen":
        return varlen_decode(query, keys, values, rows, scaling)
    raise ValueError(f"unknown decode kernel {decode_kernel!r}")


def _per_row(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: DecodeRows,
    scaling: float | None,
    kernel: str,
) -> torch.Tensor:
    assert rows.starts is not None and rows.used is not None
    # flash_attention_2 has no per-row form here; SDPA is the same math.
    single = "eager" if kernel == "eager" else "sdpa"
    outs = []
    for index, (start, used) in enumerate(zip(rows.starts, rows.used, strict=True)):
        key = layer_view(keys, rows.tokens_first, start, used)
        value = layer_view(values, rows.tokens_first, start, used)
        outs.append(
            dense_attention(query[index : index + 1], key, value, None, scaling, single, False)
        )
    return torch.cat(outs)


def _gathered(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: DecodeRows,
    scaling: float | None,
) -> torch.Tensor:
    assert rows.starts_t is not None and rows.used_t is not None
    window = torch.arange(rows.window, device=query.device)
    last = (keys.shape[0] if rows.tokens_first else keys.shape[1]) - 1
    index = (rows.starts_t.long().unsqueeze(1) + window).clamp(max=last)  # [B, W]
    if rows.tokens_first:
        key, value = keys[index].transpose(1, 2), values[index].transpose(1, 2)
    else:
        key, value = keys[:, index].transpose(0, 1), values[:, index].transpose(0, 1)
    live = window.unsqueeze(0) < rows.used_t.long().unsqueeze(1)  # [B, W]
    value = value * live.view(live.shape[0], 1, -1, 1).to(value.dtype)
    mask = live.view(live.shape[0], 1, 1, -1)
    groups = query.shape[1] // key.shape[1]
    out = nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=groups > 1
    )
    return out.transpose(1, 2).contiguous()


def varlen_available() -> bool:
    """PyTorch's varlen flash attention with per-row used lengths (`seqused_k`)."""
    try:
        module = importlib.import_module("torch.nn.attention.varlen")
    except ImportError:
        return False
    import inspect

    function = getattr(module, "varlen_attn", None)
    return function is not None and "seqused_k" in inspect.signature(function).parameters


def varlen_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    rows: DecodeRows,
    scaling: float | None,
) -> torch.Tensor:
    """CUDA only: row b reads slots [starts[b], starts[b] + used[b]) of a tokens-first pool.

    With `seqused_k`, row b's keys begin at cu_seq_k[b] and only `used[b]` are read, so
    the regions may lie anywhere in the pool; cu_seq_k's last entry only closes the list.
    """
    assert rows.starts_t is not None and rows.used_t is not None and rows.tokens_first
    varlen_attn = importlib.import_module("torch.nn.attention.varlen").varlen_attn
    batch = query.shape[0]
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=query.device)
    end = torch.full((1,), keys.shape[0], dtype=torch.int32, device=query.device)
    cu_k = torch.cat([rows.starts_t, end])
    out = varlen_attn(
        query[:, :, 0],
        keys,
        values,
        cu_q,
        cu_k,
        1,
        rows.window,
        scale=scaling,
        seqused_k=rows.used_t,
        enable_gqa=query.shape[1] != keys.shape[1],
    )
    result: torch.Tensor = out.view(batch, 1, query.shape[1], query.shape[3])
    return result
