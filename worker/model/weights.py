"""Finding a checkpoint (local folder or Hub id) and loading its safetensors strictly.

Only data files are ever fetched or read: safetensors, the index, the JSON configs and the
tokenizer files. The Hub's Python files are never downloaded, so nothing from the
checkpoint can execute (no `trust_remote_code`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from vision_queue.errors import MAX_MESSAGE_CHARS, ModelError
from worker.model.modeling import Phi3VForCausalLM

HUB_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "preprocessor_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "generation_config.json",
)
REQUIRED_FILES = ("config.json", "tokenizer.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
# The module shares `model.embed_tokens` under a second name (see vision.ImageEmbedding).
_ALIAS_PREFIX = "model.vision_embed_tokens.wte."


def resolve_checkpoint(model: str) -> Path:
    """The local folder holding the checkpoint: `model` itself, or its Hub snapshot."""
    path = Path(model).expanduser()
    if path.is_dir():
        _check_folder(path, model)
        return path
    if path.exists() or model.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(model):
        raise ModelError(f"{model!r} is neither a checkpoint folder nor a Hugging Face model id")
    folder = _hub_snapshot(model)
    _check_folder(folder, model)
    return folder


def _hub_snapshot(repo_id: str) -> Path:
    # Imported here: huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when first imported.
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=list(HUB_PATTERNS)))
    except Exception as exc:  # offline, not cached, unknown repo, network or auth failure
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            tried = f"looked only in the Hugging Face cache {cache} (HF_HUB_OFFLINE=1)"
        else:
            tried = f"looked in the Hugging Face cache {cache}, then tried the Hub"
        advice = (
            f"cannot get {repo_id}: {tried}. Get it with `hf download {repo_id}` (or "
            f"`huggingface-cli download {repo_id}`) under the same HF_HOME, or pass a local "
            "folder as the model"
        )
        # The library's own words go last, cut to what is left of an error's length, so
        # the advice above is never what gets cut.
        reason = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
        room = MAX_MESSAGE_CHARS - len(advice) - len(type(exc).__name__) - 6
        if room > 20:
            advice += f" ({type(exc).__name__}: {reason[:room]})"
        raise ModelError(advice) from exc


def _check_folder(folder: Path, model: str) -> None:
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"checkpoint {model!r} ({folder}) lacks {', '.join(missing)}")
    weight_files(folder)


def weight_files(folder: Path) -> list[Path]:
    """The shards named by model.safetensors.index.json, or the single model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read {index}: {exc}") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise ModelError(
            f"no weights in {folder}: expected model.safetensors.index.json with its shards, "
            "or model.safetensors"
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelError(f"weight shards missing from {folder}: {', '.join(missing)}")
    return files


def load_weights(
    model: Phi3VForCausalLM, folder: Path, device: torch.device, dtype: torch.dtype
) -> None:
    """Read every tensor by its official name into `model` (built on meta); strict both ways."""
    expected = _expected_keys(model)
    files = weight_files(folder)
    found: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            found.update(shard.keys())
    missing = sorted(expected - found)
    unexpected = sorted(found - expected)
    if missing or unexpected:
        raise ModelError(
            f"checkpoint {folder} does not match the model: "
            f"{len(missing)} missing key(s) {missing[:5]}, "
            f"{len(unexpected)} unexpected key(s) {unexpected[:5]}"
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=_safetensors_device(device)) as shard:
            for name in shard.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                state[name] = shard.get_tensor(name).to(dtype)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise ModelError(f"checkpoint {folder} has tensors of the wrong shape: {exc}") from exc
    model.reset_buffers(device)
    check_materialized(model)


def _expected_keys(model: Phi3VForCausalLM) -> set[str]:
    return {key for key in model.state_dict() if not key.startswith(_ALIAS_PREFIX)}


def _safetensors_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return device.type


def check_materialized(model: torch.nn.Module) -> None:
    """Fail loudly if any parameter or buffer is still on the meta device."""
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"model tensors were never loaded: {left[:5]}")

