"""The ``flap_onnx.json`` manifest that sits beside ``model.onnx``.

It records what a runtime needs to drive the graph without reading it (per-layer KV heads,
head_dim, dtype, I/O names), where the graph came from (source path plus hashes of its
config and weight headers) and how well it matched PyTorch at export time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from flap_deploy.errors import FlapDeployError

from .contract import FORMS, CacheLayer, form_of

MANIFEST_NAME = "flap_onnx.json"
MODEL_NAME = "model.onnx"
FORMAT = "flap-onnx/1"
DTYPES = {"fp32": "float32", "fp16": "float16"}


def source_identity(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Path of the source checkpoint and sha256 of its config.json and its weight headers.

    Hashing headers (names, shapes, dtypes, offsets) rather than all weight bytes keeps this
    instant for multi-GB checkpoints while still telling two checkpoints apart.
    """
    from flap_deploy.io.shards import (
        safetensors_header_bytes,  # torch; reading a manifest needs none
    )

    model_dir = Path(model_dir).resolve()
    config = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    weights = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        weights.update(file.name.encode() + b"\0" + safetensors_header_bytes(file))
    return {"path": str(model_dir), "config_sha256": config, "weights_header_sha256": weights.hexdigest()}


def build_manifest(*, config: Any, layers: list[CacheLayer], attention: str, max_length: int, opset: int,
                   dtype: str, quantize: str | None, source: dict[str, Any], input_names: list[str],
                   output_names: list[str], external_data: bool, tokenizer: bool) -> dict[str, Any]:
    """The manifest of a fresh export (verification figures are added by the exporter)."""
    from flap_deploy import __version__
    from flap_deploy.model.params import decode_step_params

    eos = config.eos_token_id
    return {
        "format": FORMAT,
        "model": MODEL_NAME,
        "external_data": external_data,
        "attention": attention,
        "max_length": max_length,
        "kv_cache": FORMS[attention].cache_layout,
        "opset": opset,
        "dtype": DTYPES[dtype],
        "quantize": quantize,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "head_dim": config.head_dim,
        "num_attention_heads_per_layer": list(config.num_attention_heads_per_layer),
        "num_key_value_heads_per_layer": list(config.num_key_value_heads_per_layer),
        "intermediate_size_per_layer": list(config.intermediate_size_per_layer),
        "cache_layers": [c.layer for c in layers],
        "inputs": input_names,
        "outputs": output_names,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos if isinstance(eos, list) or eos is None else [eos],
        "pad_token_id": config.pad_token_id,
        "max_position_embeddings": config.max_position_embeddings,
        "tokenizer": tokenizer,
        "source": source,
        # weights read per decode step, so that `compare` can take an export without its checkpoint
        "decode_step_params": decode_step_params(config.to_dict()),
        "flap": config.flap,
        "verification": {},
        "flap_deploy_version": __version__,
    }


def read_manifest(onnx_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check a manifest; one-line FlapDeployError for anything wrong."""
    onnx_dir = Path(onnx_dir)
    if not onnx_dir.is_dir():
        raise FlapDeployError(f"{onnx_dir}: not a directory")
    file = onnx_dir / MANIFEST_NAME
    if not file.is_file():
        raise FlapDeployError(f"{onnx_dir}: not an ONNX export (no {MANIFEST_NAME})")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise FlapDeployError(f"{file}: invalid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise FlapDeployError(f"{file}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("num_key_value_heads_per_layer", "cache_layers", "head_dim", "inputs", "outputs", "dtype"):
        if key not in manifest:
            raise FlapDeployError(f"{file}: key '{key}' is missing")
    if form_of(manifest) not in FORMS:
        raise FlapDeployError(f"{file}: attention is {manifest['attention']!r}, expected one of {', '.join(FORMS)}")
    if not (onnx_dir / manifest.get("model", MODEL_NAME)).is_file():
        raise FlapDeployError(f"{onnx_dir}: graph file {manifest.get('model', MODEL_NAME)} is missing")
    return manifest


def cache_layers_of(manifest: dict[str, Any]) -> list[CacheLayer]:
    kv = manifest["num_key_value_heads_per_layer"]
    return [CacheLayer(i, kv[i], manifest["head_dim"]) for i in manifest["cache_layers"]]


def check_graph_io(manifest: dict[str, Any], inputs: list[Any], outputs: list[Any], where: Path) -> None:
    """Raise if the session's inputs/outputs (ORT NodeArg lists) disagree with the manifest."""
    file = where / MANIFEST_NAME
    got_in = [i.name for i in inputs]
    if got_in != manifest["inputs"]:
        extra = sorted(set(got_in) - set(manifest["inputs"]))
        missing = sorted(set(manifest["inputs"]) - set(got_in))
        raise FlapDeployError(
            f"{file}: manifest inputs do not match the graph (graph has {extra or 'no'} extra, "
            f"lacks {missing or 'none'}{'' if extra or missing else '; order differs'})"
        )
    got_out = [o.name for o in outputs]
    if got_out != manifest["outputs"]:
        raise FlapDeployError(f"{file}: manifest outputs do not match the graph's {got_out[:3]}...")
    by_name = {i.name: i for i in inputs}
    for c in cache_layers_of(manifest):
        for name in c.past_names:
            if name not in by_name:
                raise FlapDeployError(f"{file}: layer {c.layer} has attention in the manifest but the graph has no {name}")
            shape = by_name[name].shape
            if len(shape) != 4 or shape[1] != c.kv_heads or shape[3] != c.head_dim:
                raise FlapDeployError(
                    f"{file}: layer {c.layer}: manifest says {c.kv_heads} KV heads x head_dim {c.head_dim}, "
                    f"graph input {name} has shape {shape}"
                )
