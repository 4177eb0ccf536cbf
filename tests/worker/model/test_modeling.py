"""The network's own pieces: LongRoPE, the CLIP feature layer, attention kernels, caches."""

from __future__ import annotations

import math

import pytest
import torch
from phi3v_reference import TINY_MODEL_DIR
from transformers import Phi3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from worker.engine import Engine
from worker.model.config import Phi3VConfig
from worker.model.kvcache import DynamicKVCache, StaticKVCache
from worker.model.modeling import LongRopeRotary, phi3v_attention

TINY = Phi3VConfig.from_file(TINY_MODEL_DIR / "config.json")


def rotary() -> LongRopeRotary:
    return LongRopeRotary(TINY.rope)


def transformers_inv_freq(seq_len: int | None) -> torch.Tensor:
    """transformers' own LongRoPE frequencies for the tiny config, as a cross-check."""
    rope = TINY.rope
    config = Phi3Config(
        hidden_size=TINY.hidden_size, num_attention_heads=TINY.num_attention_heads,
        max_position_embeddings=rope.max_positions,
        original_max_position_embeddings=rope.original_max_positions,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": rope.theta,
            "short_factor": list(rope.short_factor), "long_factor": list(rope.long_factor),
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
        reference = tower.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
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


def test_the_static_cache_writes_the_prompt_then_one_slot_per_step() -> None:
    cache = StaticKVCache(
        num_layers=1, kv_heads=2, head_dim=4, capacity=8, dtype=torch.float32,
        device=torch.device("cpu"),
    )
    prompt = torch.ones(1, 2, 3, 4)
    returned, _ = cache.prefill(3).update(prompt, prompt, 0)
    step = torch.full((1, 2, 1, 4), 7.0)
    keys, _ = cache.at(torch.tensor([3])).update(step, step, 0)

    assert returned is prompt
    assert torch.equal(keys[0, :, :3], prompt[0]) and torch.equal(keys[0, :, 3], step[0, :, 0])
    assert cache.mask(torch.tensor([3])).flatten().tolist() == [True] * 4 + [False] * 4
    with pytest.raises(ValueError, match="do not fit"):
        cache.prefill(9)


def test_the_dynamic_cache_grows_by_concatenation() -> None:
    cache = DynamicKVCache(num_layers=2)
    first, second = torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 1, 4)
    cache.update(first, first, 1)
    keys, values = cache.update(second, second, 1)

    assert keys.shape == values.shape == (1, 2, 4, 4)
    assert cache.keys[0] is None
