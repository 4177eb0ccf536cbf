"""Start-up self-check of the CUDA-only decode kernel against the portable one.

The varlen kernel cannot run without a GPU, so its one assumption about the pool (row b's
keys start at cu_seq_k[b] and only `seqused_k[b]` of them are read, regions anywhere in
the pool and in any order) is checked on the device itself at load, against the "gather"
kernel, on a small random pool. On a mismatch (or an error) the engine decodes with the
per-row kernel instead, and says why in its log.
"""

from __future__ import annotations

import torch

from worker.model.attention import decode_attention
from worker.model.kvcache import DecodeRows

_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def varlen_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the varlen kernel reads the pool as the gather kernel does, else why not."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    heads, dim, positions = 4, 64, 2048
    keys = torch.randn(positions + 1, heads, dim, generator=generator).to(device, dtype)
    values = torch.randn(positions + 1, heads, dim, generator=generator).to(device, dtype)
    query = torch.randn(3, heads, 1, dim, generator=generator).to(device, dtype)
    # Out of order, with a gap, one row of a single slot.
    starts = torch.tensor([1024, 0, 700], dtype=torch.int32, device=device)
    used = torch.tensor([513, 640, 1], dtype=torch.int32, device=device)
    rows = DecodeRows(tokens_first=True, window=1024, starts_t=starts, used_t=used)
    with torch.inference_mode():
        try:
            varlen = decode_attention(query, keys, values, rows, 0.125, "sdpa", "varlen")
        except Exception as exc:  # an unsupported GPU or build
            return f"varlen attention failed: {type(exc).__name__}: {str(exc)[:200]}"
        gather = decode_attention(
            query.float(), keys.float(), values.float(), rows, 0.125, "sdpa", "gather"
        )
    error = (varlen.float() - gather).abs().max().item()
    if not error <= _TOLERANCE.get(dtype, 2e-2):
        return f"varlen attention disagrees with the reference kernel (max error {error:.3g})"
    return None
