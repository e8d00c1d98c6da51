"""The contract of a quantized pruned checkpoint (compressed-tensors ``int-quantized`` /
``float-quantized``, as ``flap-deploy quantize`` writes it).

It is a pruned checkpoint whose ``config.json`` also has ``quantization_config``: every
projection weight of the per-layer contract keeps its shape (int8 / FP8 values) and gains
``NAME.weight_scale`` of shape ``[out, 1]`` (per output channel); everything else is as in
the float contract. ``validate_quantized_checkpoint`` checks the tensors against the
per-layer config, so a config that disagrees with its tensors fails in one line before
any engine starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flap_deploy.errors import FlapDeployError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def expected_quantized_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The float contract's tensors plus a per-channel ``weight_scale`` for each projection weight."""
    from flap_deploy.model.contract import expected_tensor_shapes

    shapes = expected_tensor_shapes(cfg)
    ignore = set((cfg.get("quantization_config") or {}).get("ignore") or [])
    for name, shape in list(shapes.items()):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in PROJECTIONS and module not in ignore:
            shapes[f"{module}.weight_scale"] = (shape[0], 1)
    return shapes


def validate_quantized_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Like ``checkpoint.validate_checkpoint`` for a quantized checkpoint; FlapDeployError names tensor and layer."""
    from flap_deploy.io.checkpoint import checkpoint_tensors, read_config
    from flap_deploy.model.modeling_flap_llama import (
        FlapConfigError,
        validate_flap_config,
    )

    path = Path(path)
    cfg = read_config(path)
    try:
        validate_flap_config(cfg)
    except FlapConfigError as e:
        raise FlapDeployError(f"{path / 'config.json'}: {e}") from None
    expected = expected_quantized_shapes(cfg)
    found = checkpoint_tensors(path)
    for name, shape in expected.items():
        layer = f" (layer {name.split('.')[2]})" if name.startswith("model.layers.") else ""
        if name not in found:
            raise FlapDeployError(f"{path}: tensor '{name}' is missing{layer}")
        if tuple(found[name][0]) != shape:
            raise FlapDeployError(f"{path / found[name][1]}: tensor '{name}' has shape {list(found[name][0])}, "
                                  f"config says {list(shape)}{layer}")
    for name in found:
        if name not in expected and not (cfg.get("tie_word_embeddings") and name == "lm_head.weight"):
            raise FlapDeployError(f"{path / found[name][1]}: unexpected tensor '{name}'")
    return cfg
