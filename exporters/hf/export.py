"""``flap-deploy export hf``: a pruned checkpoint in transformers' per-layer form.

transformers (5.19, ``HeterogeneousConfigMixin``) lets every config carry ``per_layer_config``:
a sparse map from a layer index to the attributes that differ in that layer, with ``skip``
naming removed sub-modules. The export writes the source family's config (``model_type``
llama, mistral, qwen2 or qwen3 and its architecture) whose global widths are the dense
source's, and per layer only what pruning changed: ``num_attention_heads`` /
``num_key_value_heads`` / ``intermediate_size``, ``skip: [self_attn]`` / ``[mlp]`` for a removed
block. The tensors are the pruned checkpoint's, copied as they are. What only FlapLlama
knows stays as extra keys (``o_proj_bias`` / ``down_proj_bias``, ``qk_norm``, ``attention_bias``,
the ``flap`` provenance), so ``FlapLlamaConfig`` reads the export back to the same model.

The config is built and written by the family's own transformers class, so stock transformers
reads what it wrote. Llama's config class checks ``hidden_size % num_attention_heads`` on the
global value, which the mixin refuses to give for a per-layer attribute; for such a class the
export sets transformers' opt-in ``allow_global_per_layer_attribute_access`` (the global value
then is the dense source's, which passes the check).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from flap_deploy.errors import FlapDeployError
from flap_deploy.io.atomic import atomic_directory, check_output_dir
from flap_deploy.io.card import write_card
from flap_deploy.io.checkpoint import copy_tokenizer_files
from flap_deploy.io.model_ref import ModelRef, resolve_model
from flap_deploy.model.adapters import ADAPTERS
from flap_deploy.model.modeling_flap_llama import (
    PER_LAYER_ATTRIBUTES,
    PER_LAYER_KEYS,
    SKIPPABLE_BY,
)

# flap_llama's own keys that the family's config has no use for (the per-layer lists become per_layer_config)
_DROPPED = {*PER_LAYER_KEYS, "model_type", "architectures", "auto_map", "transformers_version"}


def per_layer_config(cfg: dict[str, Any], globals_: dict[str, int]) -> dict[int, dict[str, Any]]:
    """transformers' ``per_layer_config`` of a flap_llama config over the given global widths: per layer
    the widths that differ, and ``skip`` for a removed attention or MLP (0 in the flap_llama lists)."""
    layers: dict[int, dict[str, Any]] = {}
    for i in range(cfg["num_hidden_layers"]):
        widths = {key: cfg[listed][i] for key, listed in PER_LAYER_ATTRIBUTES.items()}
        skip = sorted({SKIPPABLE_BY[key] for key, width in widths.items() if width == 0})
        overrides: dict[str, Any] = {key: width for key, width in widths.items()
                                     if SKIPPABLE_BY[key] not in skip and width != globals_[key]}
        if skip:
            overrides["skip"] = skip
        if overrides:
            layers[i] = overrides
    return layers


def upstream_config(cfg: dict[str, Any]) -> Any:
    """The source family's transformers config of a flap_llama config: dense global widths, per_layer_config."""
    from transformers import AutoConfig
    from transformers.integrations.heterogeneity import (
        AmbiguousGlobalPerLayerAttributeError,
    )

    provenance = cfg.get("flap") or {}
    architecture = provenance.get("source_architecture")
    if architecture not in ADAPTERS:
        raise FlapDeployError(f"the checkpoint's provenance names no supported source family "
                              f"(source_architecture {architecture!r}; supported: {', '.join(ADAPTERS)})")
    dense = provenance.get("source_config") or {}
    globals_ = {key: dense.get(key, cfg[key]) for key in PER_LAYER_ATTRIBUTES}
    fields = {k: v for k, v in cfg.items() if k not in _DROPPED}
    fields.update(globals_, architectures=[architecture], per_layer_config=per_layer_config(cfg, globals_))
    model_type = ADAPTERS[architecture].model_type
    try:
        return AutoConfig.for_model(model_type, **fields)
    except AmbiguousGlobalPerLayerAttributeError:  # a class whose own checks read a per-layer width globally
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its warning about the global read we opt into here
        try:
            return AutoConfig.for_model(model_type, **fields, allow_global_per_layer_attribute_access=True)
        finally:
            hf_logging.set_verbosity(verbosity)


def export_hf(model: str | os.PathLike | ModelRef, out: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the pruned checkpoint ``model`` to ``out`` in transformers' per-layer form (same tensors)."""
    check_output_dir(out, overwrite)
    ref = resolve_model(model, accept=("pruned",))
    if ref.config.get("quantization_config"):
        raise FlapDeployError(f"{ref.path / 'config.json'}: a quantized checkpoint; export hf takes the pruned "
                              "checkpoint it was quantized from")
    config = upstream_config(ref.config)
    out = Path(out)
    with atomic_directory(out, overwrite) as tmp:
        for weights in sorted(ref.path.glob("*.safetensors")) + sorted(ref.path.glob("*.safetensors.index.json")):
            shutil.copy2(weights, tmp / weights.name)
        config.save_pretrained(tmp)
        copy_tokenizer_files(ref.path, tmp)
        write_card(tmp, ref.config, form="hf", source=ref.path, path=out)
    layers = ref.config["num_hidden_layers"]
    return {"output": str(out), "source": str(ref.path), "model_type": config.model_type,
            "architecture": config.architectures[0], "layers": layers,
            "layers_in_per_layer_config": len(config.to_dict().get("per_layer_config") or {})}
