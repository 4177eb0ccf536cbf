"""Our plain-torch Phi-3 decoder layer and CLIP tower compute what transformers' classes do.

Given the same random weights (loaded by name, so the parameter names match too) and the
same inputs, each of our modules returns transformers' output within float32 rounding.
transformers is imported only here, as the yardstick; the worker no longer imports it.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from phi3v_reference import TINY_MODEL_DIR
from transformers import CLIPVisionConfig as HFClipConfig
from transformers import CLIPVisionModel as HFClipModel
from transformers import Phi3Config as HFPhi3Config
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer as HFDecoderLayer
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from worker.model.kvcache import DynamicKVCache
from worker.model.layers import (
    AttentionInterface,
    CLIPVisionConfig,
    CLIPVisionModel,
    Phi3Config,
    Phi3DecoderLayer,
)

SIZES = {
    "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
    "num_attention_heads": 4, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "max_position_embeddings": 256,
}
# transformers renamed the layer's cache argument (past_key_values -> cache) in 5.x.
CACHE_KEYWORD = (
    "cache" if "cache" in inspect.signature(HFDecoderLayer.forward).parameters
    else "past_key_values"
)
CLIP_SIZES = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "image_size": 56, "patch_size": 14, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def decoder_pair(kv_heads: int, kernel: str) -> tuple[Phi3DecoderLayer, torch.nn.Module]:
    ours_config = Phi3Config(**SIZES, num_key_value_heads=kv_heads)
    ours_config._attn_implementation = kernel
    theirs_config = HFPhi3Config(**SIZES, num_key_value_heads=kv_heads, pad_token_id=None)
    theirs_config._attn_implementation = kernel
    ours, theirs = Phi3DecoderLayer(ours_config, 0), HFDecoderLayer(theirs_config, 0)
    randomize(theirs, seed=kv_heads)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours.eval(), theirs.eval()


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_the_decoder_layer_matches_transformers_prefill_then_decode(
    kernel: str, kv_heads: int
) -> None:
    ours, theirs = decoder_pair(kv_heads, kernel)
    rotary = Phi3RotaryEmbedding(HFPhi3Config(**SIZES, pad_token_id=None))
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 9, 64, generator=generator)
    step = torch.randn(1, 1, 64, generator=generator)
    causal = torch.full((9, 9), float("-inf")).triu(1).view(1, 1, 9, 9)
    our_cache, their_cache = DynamicKVCache(1), DynamicKVCache(1)

    with torch.inference_mode():
        outputs = []
        for layer, cache in ((ours, our_cache), (theirs, their_cache)):
            positions = torch.arange(9).view(1, -1)
            first = layer(prompt, causal, position_embeddings=rotary(prompt, positions),
                          **{CACHE_KEYWORD: cache})
            positions = torch.tensor([[9]])
            second = layer(step, None, position_embeddings=rotary(step, positions),
                           **{CACHE_KEYWORD: cache})
            outputs.append((first, second))

    (our_prompt, our_step), (their_prompt, their_step) = outputs
    assert torch.allclose(our_prompt, their_prompt, atol=1e-5)
    assert torch.allclose(our_step, their_step, atol=1e-5)
    assert our_cache.keys[0] is not None and their_cache.keys[0] is not None
    assert torch.allclose(our_cache.keys[0], their_cache.keys[0], atol=1e-6)


def test_keywords_given_to_the_layer_reach_the_registered_attention_function() -> None:
    seen: dict[str, object] = {}

    def spy(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: object,
    ) -> tuple[torch.Tensor, None]:
        seen.update(kwargs)
        return query.transpose(1, 2), None

    AttentionInterface.register("test_spy", spy)
    config = Phi3Config(**SIZES)
    config._attn_implementation = "test_spy"
    layer = Phi3DecoderLayer(config, 0)
    hidden = torch.zeros(1, 3, 64)
    cos_sin = (torch.ones(1, 3, 16), torch.zeros(1, 3, 16))

    layer(hidden, None, position_embeddings=cos_sin, cache=None, kernel="eager", causal=True)

    assert seen["kernel"] == "eager" and seen["causal"] is True
    assert seen["scaling"] == pytest.approx(16**-0.5)


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_the_clip_tower_matches_transformers_hidden_states(kernel: str) -> None:
    ours_config = CLIPVisionConfig(**CLIP_SIZES)
    ours_config._attn_implementation = kernel
    theirs_config = HFClipConfig(**CLIP_SIZES)
    theirs_config._attn_implementation = kernel
    ours, theirs = CLIPVisionModel(ours_config), HFClipModel(theirs_config)
    randomize(theirs, seed=3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))

    with torch.inference_mode():
        expected = theirs.eval()(pixels, output_hidden_states=True).hidden_states
        actual = ours.eval().hidden_states(pixels)

    assert len(actual) == len(expected) == 4
    for mine, reference in zip(actual, expected, strict=True):
        assert torch.allclose(mine, reference, atol=1e-5)


def test_a_crop_of_the_wrong_size_is_refused() -> None:
    tower = CLIPVisionModel(CLIPVisionConfig(**CLIP_SIZES))

    with pytest.raises(ValueError, match="56x56"):
        tower.embeddings(torch.zeros(1, 3, 28, 28))


def test_a_cpu_engine_loads_and_answers_without_transformers_dynamo_or_sympy() -> None:
    """The cold-start budget: these three imports cost more than torch itself on CPU."""
    code = (
        "import sys\n"
        "from PIL import Image\n"
        "from worker.inference.engine import Engine, EngineConfig, GenerationRequest\n"
        "engine = Engine.load(EngineConfig(model=sys.argv[1], device='cpu'))\n"
        "engine.generate(GenerationRequest('Hi', [Image.new('RGB', (64, 64))], 2, num_crops=1))\n"
        "heavy = ('transformers', 'torch._dynamo', 'sympy')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(TINY_MODEL_DIR)], capture_output=True, text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"
