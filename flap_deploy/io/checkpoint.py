"""Pruned-checkpoint I/O: save (atomically, safetensors only), validate, expected shapes.

The contract lives in ARCHITECTURE.md ("Pruned checkpoint contract"); the config rules are
checked by ``validate_flap_config`` (shipped inside every checkpoint), the tensor rules here.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from flap_deploy.errors import FlapDeployError
from flap_deploy.io.atomic import atomic_directory
from flap_deploy.io.shards import MAX_SHARD_BYTES, read_safetensors_header
from flap_deploy.model import modeling_flap_llama
from flap_deploy.model.contract import expected_tensor_shapes
from flap_deploy.model.modeling_flap_llama import FlapConfigError, validate_flap_config

MODELING_FILE = Path(modeling_flap_llama.__file__)  # shipped beside the weights (trust_remote_code)
AUTO_MAP = {
    "AutoConfig": "modeling_flap_llama.FlapLlamaConfig",
    "AutoModelForCausalLM": "modeling_flap_llama.FlapLlamaForCausalLM",
}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of a model directory, with one-line errors for a missing or broken file."""
    path = Path(path)
    if not path.exists():
        raise FlapDeployError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise FlapDeployError(f"{path}: not a directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FlapDeployError(f"{path}: not a model checkpoint (no config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise FlapDeployError(f"{cfg_file}: invalid JSON ({e})") from None


def checkpoint_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, file name) over all safetensors shards of a directory."""
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickles:
        raise FlapDeployError(f"{path}: pickle weight files are not accepted ({', '.join(pickles)}); use safetensors")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FlapDeployError(f"{path}: no .safetensors weight files")
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        for name, entry in read_safetensors_header(file).items():
            tensors[name] = (tuple(entry["shape"]), file.name)
    return tensors


def validate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a pruned checkpoint against every contract rule; return its config dict.

    Raises FlapDeployError naming the file, key, tensor or layer that breaks a rule.
    """
    path = Path(path)
    cfg = read_config(path)
    cfg_file = path / "config.json"
    if cfg.get("model_type") != "flap_llama":
        raise FlapDeployError(f"{cfg_file}: model_type is {cfg.get('model_type')!r}, expected 'flap_llama'")
    try:
        validate_flap_config(cfg)
    except FlapConfigError as e:
        raise FlapDeployError(f"{cfg_file}: {e}") from None
    for key in ("hidden_size", "vocab_size"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise FlapDeployError(f"{cfg_file}: config key '{key}' must be a positive integer, got {cfg.get(key)!r}")
    expected = expected_tensor_shapes(cfg)
    found = checkpoint_tensors(path)
    tied = cfg.get("tie_word_embeddings", False)
    for name, shape in expected.items():
        if name not in found:
            raise FlapDeployError(f"{path}: tensor '{name}' is missing{_layer_hint(name)}")
        if found[name][0] != shape:
            raise FlapDeployError(
                f"{path / found[name][1]}: tensor '{name}' has shape {list(found[name][0])}, "
                f"config says {list(shape)}{_layer_hint(name)}"
            )
    for name in found:
        if name not in expected and not (tied and name == "lm_head.weight"):
            raise FlapDeployError(f"{path / found[name][1]}: unexpected tensor '{name}'{_layer_hint(name)}")
    return cfg


def _layer_hint(name: str) -> str:
    parts = name.split(".")
    return f" (layer {parts[2]})" if len(parts) > 2 and parts[1] == "layers" else ""


def copy_tokenizer_files(source: str | os.PathLike | None, dest: Path) -> None:
    """Copy tokenizer and generation-config files from a model directory, when there is one."""
    if source is None or not Path(source).is_dir():
        return
    for name in TOKENIZER_FILES:
        src = Path(source) / name
        if src.is_file():
            shutil.copy2(src, dest / name)


def finish_checkpoint(tmp: Path, config: Any, *, tokenizer: Any = None,
                      tokenizer_from: str | os.PathLike | None = None) -> None:
    """Everything of a contract checkpoint beside its weights, then the whole contract checked.

    config.json with an ``auto_map`` and the self-contained modeling file make it loadable with
    ``trust_remote_code=True`` without this package; tokenizer files come from ``tokenizer`` or
    are copied from ``tokenizer_from``.
    """
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(tmp)
    shutil.copy2(MODELING_FILE, tmp / MODELING_FILE.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    copy_tokenizer_files(tokenizer_from, tmp)
    validate_checkpoint(tmp)


def save_checkpoint(model: nn.Module, out: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None,
                    tokenizer: Any = None, overwrite: bool = False) -> Path:
    """Save an in-memory FlapLlamaForCausalLM as a contract checkpoint, atomically (safetensors,
    sharded past ``shards.MAX_SHARD_BYTES``)."""
    with atomic_directory(out, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_BYTES)
        finish_checkpoint(tmp, model.config, tokenizer=tokenizer, tokenizer_from=tokenizer_from)
    return Path(out)
