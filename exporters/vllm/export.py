"""``flap-deploy export vllm``: a checked, ready-to-serve checkpoint directory for vLLM.

The output is a contract checkpoint (vLLM reads the same format; the plugin supplies the
architecture) in the requested dtype, checked against vLLM's rules for the requested
tensor-parallel size, with its model card (README.md: how it was made, how to serve it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from flap_deploy.errors import ParameterError
from flap_deploy.io.atomic import atomic_directory, check_output_dir
from flap_deploy.io.card import write_card
from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy.io.model_ref import CHECKPOINTS, ModelRef, resolve_model

from .validate import validate_for_vllm

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

def widths_of(ref: ModelRef) -> dict[str, Any]:
    """config.json of a contract checkpoint (validated by ``resolve_model``), or the width keys of a foreign one."""
    if ref.kind == "pruned":
        return ref.config
    from flap_deploy.io.convert import widths_config

    return widths_config(ref.path, ref.config)


def load_for_export(ref: ModelRef, dtype: torch.dtype) -> tuple[torch.nn.Module, str]:
    """A FlapLlamaForCausalLM from a contract checkpoint or another pruner's per-layer-width one."""
    if ref.kind == "pruned":
        return ref.load(dtype), "flap_llama"
    from flap_deploy.io.convert import import_per_layer_checkpoint

    return import_per_layer_checkpoint(ref.path, dtype=dtype), f"imported from {ref.config.get('model_type')}"


def export_vllm(model: str | os.PathLike | ModelRef, out: str | os.PathLike, *, dtype: str = "bfloat16", tp_size: int = 1,
                overwrite: bool = False) -> dict[str, Any]:
    """Validate ``model`` for vLLM at ``tp_size``, convert it to ``dtype`` and write it to ``out``.

    ``model`` is a contract checkpoint, a per-layer-width checkpoint of a supported source
    family written by another tool, or a bundled model name. Returns a summary dict.
    """
    if dtype not in DTYPES:
        raise ParameterError("dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_output_dir(out, overwrite)
    ref = resolve_model(model, accept=CHECKPOINTS)
    path = ref.path
    validate_for_vllm(widths_of(ref), tp_size, source=f"{path}")  # before loading any weight
    loaded, origin = load_for_export(ref, DTYPES[dtype])
    cfg = loaded.config.to_dict()
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        save_checkpoint(loaded, tmp, tokenizer_from=path, overwrite=True)
        write_card(tmp, cfg, source=path, path=out, tp_size=tp_size)
        summary = {"output": str(out), "source": str(path), "origin": origin, "dtype": dtype, "tp_size": tp_size,
                   "layers": cfg["num_hidden_layers"], "parameters": sum(p.numel() for p in loaded.parameters())}
        (tmp / "flap_vllm.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
