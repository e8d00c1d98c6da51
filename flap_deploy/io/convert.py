"""Import a per-layer-width Llama/Mistral/Qwen2/Qwen3 checkpoint written by another pruner.

Other structured pruners (LLM-Pruner, ModelOpt-style width pruning, ...) save a checkpoint
of the source family whose layers have different widths, recording them in config keys
such as ``layer_head_num`` / ``layer_inter_size`` or only in the tensor shapes. This module
reads the widths from the tensor shapes (the truth), cross-checks any per-layer config
list, and turns the checkpoint into a contract FlapLlama model, so it can be exported and
served (``export vllm`` and the vLLM launcher use it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import init_empty_weights
from safetensors import safe_open

from flap_deploy.errors import FlapDeployError
from flap_deploy.io.checkpoint import checkpoint_tensors, read_config
from flap_deploy.model.adapters import get_adapter
from flap_deploy.model.config import flap_config
from flap_deploy.model.layout import LayerWidths
from flap_deploy.model.modeling_flap_llama import FlapLlamaForCausalLM

# Per-layer config lists other tools write, by what they count. A scalar under the
# standard key is the dense value and is not a per-layer list.
PER_LAYER_ALIASES = {
    "heads": ("layer_head_num", "num_attention_heads_per_layer", "num_attention_heads", "num_heads_per_layer"),
    "kv_heads": ("layer_kv_head_num", "num_key_value_heads_per_layer", "num_key_value_heads"),
    "mlp": ("layer_inter_size", "intermediate_size_per_layer", "intermediate_size", "ffn_dim_per_layer"),
}
_SKIP_TENSORS = ("rotary_emb.inv_freq",)


def _per_layer_lists(cfg: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    found = {}
    for what, keys in PER_LAYER_ALIASES.items():
        for key in keys:
            if isinstance(cfg.get(key), list):
                found[what] = (key, cfg[key])
                break
    return found


def _head_dim(cfg: dict[str, Any], shapes: dict[str, tuple[tuple[int, ...], str]], lists: dict) -> int:
    if isinstance(cfg.get("head_dim"), int):
        return cfg["head_dim"]
    heads = cfg.get("num_attention_heads")
    if isinstance(heads, int) and "heads" not in lists:
        return cfg["hidden_size"] // heads
    # A per-layer head list and q_proj rows give head_dim in any layer that kept heads.
    if "heads" in lists:
        key, values = lists["heads"]
        for i, n in enumerate(values):
            name = f"model.layers.{i}.self_attn.q_proj.weight"
            if n and name in shapes:
                return shapes[name][0][0] // n
    raise FlapDeployError("cannot determine head_dim: config.json has no 'head_dim' and no per-layer head counts")


def layer_widths(path: Path, cfg: dict[str, Any]) -> tuple[list[LayerWidths], int]:
    """Per-layer widths from the tensor shapes (cross-checked with config lists) and head_dim."""
    shapes = checkpoint_tensors(path)
    lists = _per_layer_lists(cfg)
    head_dim = _head_dim(cfg, shapes, lists)
    n_layers = cfg["num_hidden_layers"]
    widths = []
    for i in range(n_layers):
        p = f"model.layers.{i}."

        def rows(name: str) -> int:
            return shapes[p + name][0][0] if p + name in shapes else 0

        q, k, m = rows("self_attn.q_proj.weight"), rows("self_attn.k_proj.weight"), rows("mlp.gate_proj.weight")
        if q % head_dim or k % head_dim:
            raise FlapDeployError(
                f"{path}: layer {i}: q_proj/k_proj rows {q}/{k} are not multiples of head_dim {head_dim}"
            )
        w = LayerWidths(heads=q // head_dim, kv_heads=k // head_dim, mlp=m)
        for what, (key, values) in lists.items():
            if len(values) != n_layers:
                raise FlapDeployError(
                    f"{path / 'config.json'}: config key '{key}' has {len(values)} entries, "
                    f"num_hidden_layers is {n_layers}"
                )
            if values[i] != getattr(w, what):
                raise FlapDeployError(
                    f"{path / 'config.json'}: config key '{key}' layer {i} says {values[i]}, the weights have "
                    f"{getattr(w, what)}"
                )
        widths.append(w)
    return widths, head_dim


def widths_config(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The contract's width keys (per-layer lists and maxima) of a foreign checkpoint, from shapes only."""
    widths, head_dim = layer_widths(path, cfg)
    heads, kv, mlp = ([getattr(w, k) for w in widths] for k in ("heads", "kv_heads", "mlp"))
    return {**cfg, "head_dim": head_dim, "num_attention_heads_per_layer": heads, "num_key_value_heads_per_layer": kv,
            "intermediate_size_per_layer": mlp, "num_attention_heads": max(max(heads), 1),
            "num_key_value_heads": max(max(kv), 1), "intermediate_size": max(max(mlp), 1)}


def import_per_layer_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> FlapLlamaForCausalLM:
    """Load a per-layer-width checkpoint of a supported source family as a FlapLlamaForCausalLM."""
    path = Path(path)
    cfg = read_config(path)

    class _View:
        def __init__(self, d: dict[str, Any]):
            self.__dict__.update(d)

    adapter = get_adapter(_View(cfg))
    widths, head_dim = layer_widths(path, cfg)
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                if not name.endswith(_SKIP_TENSORS):
                    tensors[name] = f.get_tensor(name)
    # The source config with dense scalars (maxima) in place of any per-layer lists.
    dense = {k: v for k, v in cfg.items() if not isinstance(v, list) or k in ("architectures", "eos_token_id")}
    dense.update(
        head_dim=head_dim,
        num_attention_heads=max(w.heads for w in widths),
        num_key_value_heads=max(max(w.kv_heads for w in widths), 1),
        intermediate_size=max(w.mlp for w in widths),
    )
    for aliases in PER_LAYER_ALIASES.values():
        for key in aliases:
            if key not in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
                dense.pop(key, None)
    config_cls = transformers.CONFIG_MAPPING[cfg["model_type"]]
    source = config_cls(**{k: v for k, v in dense.items() if k not in ("model_type", "transformers_version")})
    source.architectures = [adapter.architecture]

    hidden = cfg["hidden_size"]
    layers = range(cfg["num_hidden_layers"])
    o_bias = any(f"model.layers.{i}.self_attn.o_proj.bias" in tensors for i in layers)
    down_bias = any(f"model.layers.{i}.mlp.down_proj.bias" in tensors for i in layers)
    for i in layers:  # a layer without its own bias gets a zero one, so the format stays uniform
        for flag, name in ((o_bias, "self_attn.o_proj.bias"), (down_bias, "mlp.down_proj.bias")):
            if flag:
                tensors.setdefault(f"model.layers.{i}.{name}", torch.zeros(hidden))
    config = flap_config(source, widths, o_proj_bias=o_bias, down_proj_bias=down_bias,
                         provenance={"method": "imported", "source_model": str(path),
                                     "source_architecture": adapter.architecture})
    config.dtype = dtype
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    state = {name: t.to(dtype) for name, t in tensors.items()}
    with init_empty_weights(include_buffers=False):
        model = FlapLlamaForCausalLM(config)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise FlapDeployError(f"{path}: unexpected tensor '{unexpected[0]}' for a {adapter.architecture} layout")
    missing = sorted(expected - set(state))
    if missing:
        raise FlapDeployError(f"{path}: tensor '{missing[0]}' is missing")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()
