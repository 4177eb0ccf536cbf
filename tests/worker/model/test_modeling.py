"""The network's own pieces: LongRoPE (per row), the CLIP feature layer, attention kernels,
row-independent linear maps, the KV pool and its regions."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from phi3v_reference import TINY_MODEL_DIR
from transformers import Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from worker.inference.engine import Engine
from worker.model.attention import decode_attention
from worker.model.config import Phi3VConfig
from worker.model.kvcache import DecodeRows, DecodeWriter, DynamicKVCache, KVPool, RegionAllocator
from worker.model.modeling import LongRopeRotary, RowIndependentLinear, phi3v_attention

TINY = Phi3VConfig.from_file(TINY_MODEL_DIR / "config.json")


def rotary() -> LongRopeRotary:
    return LongRopeRotary(TINY.rope)


def transformers_inv_freq(seq_len: int | None) -> torch.Tensor:
    """transformers' own LongRoPE frequencies for the tiny config, as a cross-check."""
    rope = TINY.rope
    config = Phi3Config(
        hidden_size=TINY.hidden_size,
        num_attention_heads=TINY.num_attention_heads,
        max_position_embeddings=rope.max_positions,
        original_max_position_embeddings=rope.original_max_positions,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": rope.theta,
            "short_factor": list(rope.short_factor),
            "long_factor": list(rope.long_factor),
        },
    )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=seq_len)
    assert scaling == pytest.approx(rope.attention_scaling)
    return inv_freq


def test_short_and_long_frequencies_are_transformers_longrope() -> None:
    module = rotary()

    assert torch.equal(module.short_inv_freq, transformers_inv_freq(None))
    assert torch.equal(module.long_inv_freq, transformers_inv_freq(2049))
    assert module.attention_scaling == pytest.approx(math.sqrt(17 / 11))


def test_factors_are_chosen_per_call_from_the_furthest_position() -> None:
    module = rotary()
    short, long = module.short_inv_freq, module.long_inv_freq

    def angle_of(positions: list[int], index: int) -> torch.Tensor:
        cos, _ = module(torch.tensor([positions]), torch.float32)
        return cos[0, index, 1]  # dimension 1: a frequency where short and long differ

    scale = module.attention_scaling
    # Position 5 in a call reaching 2047 (2048 positions): short factors.
    assert angle_of([5, 2047], 0) == pytest.approx(scale * math.cos(5 * short[1].item()))
    # The same position in a call reaching 2048 (2049 positions): long factors.
    assert angle_of([5, 2048], 0) == pytest.approx(scale * math.cos(5 * long[1].item()))
    # A decode step alone at position 2048 is long, at 2047 short.
    assert angle_of([2048], 0) == pytest.approx(scale * math.cos(2048 * long[1].item()), rel=1e-5)
    assert angle_of([2047], 0) == pytest.approx(scale * math.cos(2047 * short[1].item()), rel=1e-5)


def test_patch_features_are_clip_hidden_states_minus_two_without_cls(cpu_engine: Engine) -> None:
    tower = cpu_engine.model.model.vision_embed_tokens.img_processor
    pixels = torch.randn(2, 3, 336, 336)
    with torch.inference_mode():
        reference = tower.vision_model.hidden_states(pixels)[-2]
        features = tower.patch_features(pixels, -2)

    assert features.shape == (2, 576, 32)
    assert torch.allclose(features, reference[:, 1:], atol=1e-6)


def random_qkv(q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, 4, q_len, 16, generator=generator),
        torch.randn(1, 4, k_len, 16, generator=generator),
        torch.randn(1, 4, k_len, 16, generator=generator),
    )


def test_eager_and_sdpa_agree_on_a_causal_prompt() -> None:
    q, k, v = random_qkv(7, 7)
    module = torch.nn.Identity()

    eager, _ = phi3v_attention(module, q, k, v, None, 0.25, kernel="eager", causal=True)
    sdpa, _ = phi3v_attention(module, q, k, v, None, 0.25, kernel="sdpa", causal=True)

    assert torch.allclose(eager, sdpa, atol=1e-5)
    # The first query sees only the first key.
    assert torch.allclose(eager[0, 0], v[0, :, 0], atol=1e-6)


def test_a_masked_static_cache_attends_like_the_unpadded_keys() -> None:
    q, k, v = random_qkv(1, 5)
    padded_k = torch.cat([k, torch.randn(1, 4, 3, 16)], dim=2)  # 3 stale slots
    padded_v = torch.cat([v, torch.randn(1, 4, 3, 16)], dim=2)
    mask = (torch.arange(8) <= 4).view(1, 1, 1, 8)
    module = torch.nn.Identity()

    plain, _ = phi3v_attention(module, q, k, v, None, 0.25, kernel="sdpa")
    for kernel in ("sdpa", "eager"):
        masked, _ = phi3v_attention(module, q, padded_k, padded_v, mask, 0.25, kernel=kernel)
        assert torch.allclose(masked, plain, atol=1e-5), kernel


def test_each_row_chooses_its_own_rope_factors() -> None:
    module = rotary()
    # Row 0 decodes at 2047 (2048 positions: short), row 1 at 2048 (long), in one call.
    cos, _ = module(torch.tensor([[2047], [2048]]), torch.float32)
    alone = [module(torch.tensor([[p]]), torch.float32)[0][0] for p in (2047, 2048)]

    assert torch.equal(cos[0], alone[0]) and torch.equal(cos[1], alone[1])
    # A prompt chunk takes the whole prompt's choice: positions 0..9 of a 2,372-token prompt.
    chunk, _ = module(torch.arange(10).unsqueeze(0), torch.float32, torch.tensor([2372]))
    whole, _ = module(torch.arange(2372).unsqueeze(0), torch.float32)
    assert torch.equal(chunk[0], whole[0, :10])


@pytest.mark.parametrize("shape", [(64, 192), (128, 64), (64, 32064)])
def test_row_independent_linears_give_every_row_its_single_row_bits(shape: tuple) -> None:
    # Batched float32 GEMMs on the CPU round differently per batch size; rows computed
    # one by one must equal the single-row product exactly, wherever they sit.
    inputs, outputs = shape
    linear = RowIndependentLinear(inputs, outputs, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.02)
    x = torch.randn(9, 1, inputs)
    linear.row_independent = True
    with torch.inference_mode():
        batched = linear(x)
        alone = [linear(x[i : i + 1]) for i in range(9)]
        linear.row_independent = False
        plain = linear(x)

    assert all(torch.equal(batched[i], alone[i][0]) for i in range(9))
    # (`plain`, one GEMM over the batch, differs in the last bits on the CPUs measured;
    # that is BLAS-specific, so it is only shown, not asserted.)
    assert torch.allclose(plain, batched, atol=1e-5)


def pool_of(positions: int, tokens_first: bool) -> KVPool:
    return KVPool(
        num_layers=1,
        kv_heads=4,
        head_dim=16,
        positions=positions,
        dtype=torch.float32,
        device=torch.device("cpu"),
        tokens_first=tokens_first,
        zeroed=True,
    )


@pytest.mark.parametrize("tokens_first", [False, True])
def test_decode_kernels_read_exactly_each_rows_region(tokens_first: bool) -> None:
    # Given a pool where three rows own regions (out of order, one of a single slot)
    # and every other slot holds garbage,
    pool = pool_of(256, tokens_first)
    generator = torch.Generator().manual_seed(1)
    for store in (pool.keys[0], pool.values[0]):
        store.copy_(torch.randn(store.shape, generator=generator) * 50)
    starts, used = [96, 0, 40], [33, 20, 1]
    query = torch.randn(3, 4, 1, 16, generator=generator)
    expected = []
    for row, (start, length) in enumerate(zip(starts, used, strict=True)):
        key, value = pool.region(0, start, length)
        plain, _ = phi3v_attention(
            torch.nn.Identity(), query[row : row + 1], key, value, None, 0.25
        )
        expected.append(plain)
    rows = DecodeRows(
        tokens_first=tokens_first,
        window=64,
        starts=starts,
        used=used,
        starts_t=torch.tensor(starts, dtype=torch.int32),
        used_t=torch.tensor(used, dtype=torch.int32),
    )
    keys, values = pool.keys[0], pool.values[0]

    # when decoding with the per-row and the gathered kernel, then each row sees only its own
    per_row = decode_attention(query, keys, values, rows, 0.25, "sdpa", "rows")
    gathered = decode_attention(query, keys, values, rows, 0.25, "sdpa", "gather")

    for row in range(3):
        assert torch.equal(per_row[row : row + 1], expected[row])  # bit for bit
        assert torch.allclose(gathered[row : row + 1], expected[row], atol=1e-5)


def test_a_decode_step_writes_one_slot_per_row() -> None:
    pool = pool_of(64, tokens_first=False)
    new = torch.stack([torch.full((4, 1, 16), 7.0), torch.full((4, 1, 16), 9.0)])
    keys, _ = DecodeWriter(pool, torch.tensor([5, 30])).update(new, new, 0)

    assert keys is pool.keys[0]
    assert torch.equal(pool.region(0, 5, 1)[0], new[:1]) and torch.equal(
        pool.region(0, 30, 1)[0], new[1:]
    )


def test_regions_are_first_fit_and_merge_when_freed() -> None:
    regions = RegionAllocator(100, granularity=10)

    first, second, third = regions.allocate(25), regions.allocate(10), regions.allocate(50)
    assert (first, second, third) == (0, 30, 40)
    assert regions.allocate(20) is None  # 10 positions left
    regions.free(second)
    assert regions.allocate(11) is None and regions.largest_free == 10
    regions.free(first)  # merges with the freed 30..40
    assert regions.largest_free == 40
    assert regions.allocate(40) == 0
    regions.free(0)
    regions.free(third)
    assert regions.free_positions == 100 and regions.largest_free == 100


def test_the_dynamic_cache_grows_by_concatenation() -> None:
    cache = DynamicKVCache(num_layers=2)
    first, second = torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 1, 4)
    cache.update(first, first, 1)
    keys, values = cache.update(second, second, 1)

    assert keys.shape == values.shape == (1, 2, 4, 4)
    assert cache.keys[0] is None


def test_the_decoder_layers_are_called_with_their_current_arguments(cpu_engine: Engine) -> None:
    # transformers deprecates `past_key_values=` (removed in 5.40) for `cache=`.
    embeds = torch.randn(1, 5, cpu_engine.model.config.hidden_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.inference_mode():
            cpu_engine.model(embeds, torch.arange(5).unsqueeze(0), DynamicKVCache(2), causal=True)
