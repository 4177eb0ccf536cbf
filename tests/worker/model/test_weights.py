"""Checkpoint resolution and strict loading by the official key names."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from phi3v_reference import TINY_MODEL_DIR
from safetensors.torch import load_file, save_file

from vision_queue.errors import ModelError
from worker.model.config import Phi3VConfig
from worker.model.modeling import Phi3VForCausalLM, build_model
from worker.model.weights import load_weights, resolve_checkpoint

CPU = torch.device("cpu")
DATA_FILES = (
    "config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json",
)


def checkpoint_copy(folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """The tiny checkpoint's data files in `folder`, with `tensors` as its model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        shutil.copy(TINY_MODEL_DIR / name, folder / name)
    if tensors is None:
        shutil.copy(TINY_MODEL_DIR / "model.safetensors", folder / "model.safetensors")
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def loaded(folder: Path) -> Phi3VForCausalLM:
    model = build_model(Phi3VConfig.from_file(folder / "config.json"))
    load_weights(model, folder, CPU, torch.float32)
    return model


def official_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(TINY_MODEL_DIR / "model.safetensors"))


def test_every_official_key_lands_in_the_model_upcast_exactly() -> None:
    model = loaded(TINY_MODEL_DIR)
    state = model.state_dict()

    for name, tensor in official_tensors().items():
        assert torch.equal(state[name], tensor.float()), name
        assert state[name].dtype == torch.float32


def test_the_image_embedding_shares_the_text_embedding_without_a_key() -> None:
    model = loaded(TINY_MODEL_DIR)

    assert model.model.vision_embed_tokens.wte is model.model.embed_tokens
    assert "model.vision_embed_tokens.wte.weight" not in official_tensors()


def test_sharded_checkpoints_load_through_their_index(tmp_path: Path) -> None:
    tensors = official_tensors()
    folder = checkpoint_copy(tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    sharded, single = loaded(folder).state_dict(), loaded(TINY_MODEL_DIR).state_dict()

    assert all(torch.equal(sharded[name], single[name]) for name in tensors)


def test_a_missing_key_is_an_error_naming_it(tmp_path: Path) -> None:
    tensors = official_tensors()
    del tensors["model.vision_embed_tokens.glb_GN"]

    missing = r"1 missing key\(s\) \['model\.vision_embed_tokens\.glb_GN'\]"
    with pytest.raises(ModelError, match=missing):
        loaded(checkpoint_copy(tmp_path / "ckpt", tensors))


def test_an_unexpected_key_is_an_error_naming_it(tmp_path: Path) -> None:
    tensors = official_tensors()
    tensors["model.vision_embed_tokens.wte.weight"] = tensors["model.embed_tokens.weight"].clone()

    with pytest.raises(ModelError, match=r"1 unexpected key\(s\) \['model.vision_embed_tokens.wte"):
        loaded(checkpoint_copy(tmp_path / "ckpt", tensors))


def test_a_tensor_of_the_wrong_shape_is_an_error(tmp_path: Path) -> None:
    tensors = official_tensors()
    tensors["model.norm.weight"] = torch.ones(65, dtype=torch.bfloat16)

    with pytest.raises(ModelError, match="wrong shape"):
        loaded(checkpoint_copy(tmp_path / "ckpt", tensors))


def test_a_folder_without_weights_is_an_error(tmp_path: Path) -> None:
    folder = checkpoint_copy(tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()

    with pytest.raises(ModelError, match="no weights"):
        resolve_checkpoint(str(folder))


def test_an_index_naming_a_missing_shard_is_an_error(tmp_path: Path) -> None:
    folder = checkpoint_copy(tmp_path / "ckpt")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(ModelError, match=r"model-00002-of-00002\.safetensors"):
        resolve_checkpoint(str(folder))


@pytest.mark.parametrize("model", ["./no/such/folder", "not a model id", "/nonexistent"])
def test_neither_folder_nor_hub_id_is_an_error(model: str) -> None:
    with pytest.raises(ModelError, match="neither a checkpoint folder nor"):
        resolve_checkpoint(model)


def run_offline(code: str, hf_home: Path) -> subprocess.CompletedProcess[str]:
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported: a fresh interpreter.
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
        check=False,
    )


def test_an_uncached_hub_id_offline_says_what_was_tried_and_how_to_get_it(tmp_path: Path) -> None:
    code = (
        "from worker.model.weights import resolve_checkpoint\n"
        "from vision_queue.errors import ModelError\n"
        "try:\n    resolve_checkpoint('microsoft/Phi-3-vision-128k-instruct')\n"
        "except ModelError as exc:\n    print(exc)\n"
    )
    out = run_offline(code, tmp_path / "hf").stdout

    assert "microsoft/Phi-3-vision-128k-instruct" in out
    assert "HF_HUB_OFFLINE=1" in out and str(tmp_path / "hf") in out
    assert "hf download microsoft/Phi-3-vision-128k-instruct" in out
    assert "huggingface-cli download" in out


def test_a_hub_id_is_served_from_the_hugging_face_cache(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--example--phi3v-tiny"
    checkpoint_copy(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    code = (
        "from worker.inference.engine import Engine, EngineConfig\n"
        "engine = Engine.load(EngineConfig(model='example/phi3v-tiny', device='cpu'))\n"
        "print(engine.model_id, engine.generate.__name__)\n"
    )
    result = run_offline(code, tmp_path / "hf")

    assert result.returncode == 0, result.stderr
    assert "example/phi3v-tiny generate" in result.stdout
