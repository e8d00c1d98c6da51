"""The single place that turns keep-masks into a smaller model.

Pruning algorithms only decide masks; ``compress`` slices a dense model of any supported
family into a ``FlapLlamaForCausalLM`` and, given calibration means, compensates what was
removed: ``b += W[:, pruned] @ mean[pruned]`` on o_proj and down_proj (FLAP's ``bias``
reconstruction). The one alternative, the ``ls`` refit (``reconstruct``), hands over the new
o_proj / down_proj weights and biases of the kept columns, which replace slice + compensation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from .adapters import Adapter, Geometry, get_adapter
from .errors import FlapDeployError
from .modeling_flap_llama import FlapLlamaConfig, FlapLlamaForCausalLM
from .reconstruct import LayerRefit, Refit

# Source config keys that describe the dense layout or the source runtime, not the model.
_DROPPED_KEYS = {
    "model_type", "architectures", "auto_map", "quantization_config", "layer_types", "use_sliding_window",
    "max_window_layers", "transformers_version", "_name_or_path", "_model_name_or_path", "_attn_implementation",
    "_commit_hash", "torch_dtype",
}


@dataclass
class LayerMask:
    """Which units of one layer survive. None keeps everything.

    ``heads``: bool [num_attention_heads] over query heads. A KV head is kept when any of
    its query heads is; every kept KV group must keep the same number of query heads.
    ``mlp``: bool [intermediate_size] over MLP channels.
    """

    heads: torch.Tensor | None = None
    mlp: torch.Tensor | None = None


@dataclass
class LayerMeans:
    """Calibration means of the inputs of o_proj ([heads * head_dim]) and down_proj ([intermediate])."""

    attn: torch.Tensor | None = None
    mlp: torch.Tensor | None = None


@dataclass
class LayerWidths:
    heads: int
    kv_heads: int
    mlp: int


@dataclass
class _Sliced:
    widths: list[LayerWidths] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def kept_head_order(heads: torch.Tensor, geom: Geometry, layer: int) -> tuple[list[int], list[int]]:
    """Kept query heads (grouped by KV head, in order) and kept KV heads for one layer's mask."""
    heads = heads.bool().cpu()
    if heads.numel() != geom.num_heads:
        raise FlapDeployError(f"layer {layer}: head mask has {heads.numel()} entries, the model has {geom.num_heads} heads")
    per_group = heads.view(geom.num_kv_heads, geom.group_size)
    counts = per_group.sum(dim=1)
    kv_kept = [g for g in range(geom.num_kv_heads) if counts[g] > 0]
    sizes = {int(counts[g]) for g in kv_kept}
    if len(sizes) > 1:
        raise FlapDeployError(
            f"layer {layer}: kept query heads per KV group differ ({sorted(sizes)}); "
            "every kept group of a layer must keep the same number of query heads"
        )
    q_kept = [g * geom.group_size + j for g in kv_kept for j in range(geom.group_size) if per_group[g, j]]
    return q_kept, kv_kept


def _rows(heads: list[int], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _compensation(weight: torch.Tensor, kept: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor | None:
    """W[:, pruned] @ mean[pruned] in float64, or None without means."""
    if mean is None:
        return None
    pruned = torch.ones(weight.shape[1], dtype=torch.bool)
    pruned[kept] = False
    return weight.double()[:, pruned] @ mean.double().to(weight.device)[pruned]


def _bias(linear: nn.Linear, compensation: torch.Tensor | None) -> torch.Tensor | None:
    base = linear.bias.detach().double() if linear.bias is not None else None
    if compensation is None:
        return base
    return compensation if base is None else base + compensation


def _out_proj(linear: nn.Linear, kept: torch.Tensor, mean: torch.Tensor | None, refit: Refit | None,
              layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight of the kept columns, float64 bias or None) of o_proj / down_proj: the refit when
    given, else the sliced weight with the mean compensation (when means are given)."""
    if refit is None:
        return linear.weight.detach()[:, kept], _bias(linear, _compensation(linear.weight.detach(), kept, mean))
    if not torch.equal(refit.kept.cpu(), kept.cpu()):
        raise FlapDeployError(f"layer {layer}: the refit's kept columns differ from the mask's")
    return refit.weight.to(linear.weight.dtype), refit.bias


def _slice_layer(adapter: Adapter, model: nn.Module, i: int, geom: Geometry, mask: LayerMask,
                 means: LayerMeans | None, refit: LayerRefit | None, out: _Sliced, with_o_bias: bool,
                 with_down_bias: bool) -> None:
    m = adapter.layer_modules(model, i)
    prefix = f"model.layers.{i}."
    dtype = m.q_proj.weight.dtype
    hd = geom.head_dim
    put = out.tensors.__setitem__

    heads = mask.heads if mask.heads is not None else torch.ones(geom.num_heads, dtype=torch.bool)
    q_kept, kv_kept = kept_head_order(heads, geom, i)
    q_rows, kv_rows = _rows(q_kept, hd), _rows(kv_kept, hd)
    o_weight, o_bias = _out_proj(m.o_proj, q_rows, means.attn if means else None, refit.attn if refit else None, i)
    if q_kept:
        put(prefix + "input_layernorm.weight", m.input_layernorm.weight.detach())
        for name, proj, rows in (("q_proj", m.q_proj, q_rows), ("k_proj", m.k_proj, kv_rows), ("v_proj", m.v_proj, kv_rows)):
            put(prefix + f"self_attn.{name}.weight", proj.weight.detach()[rows])
            if proj.bias is not None:
                put(prefix + f"self_attn.{name}.bias", proj.bias.detach()[rows])
        put(prefix + "self_attn.o_proj.weight", o_weight)
        if m.q_norm is not None:
            put(prefix + "self_attn.q_norm.weight", m.q_norm.weight.detach())
            put(prefix + "self_attn.k_norm.weight", m.k_norm.weight.detach())
    if with_o_bias:
        bias = o_bias if o_bias is not None else torch.zeros(geom.hidden_size, dtype=torch.float64)
        put(prefix + "self_attn.o_proj.bias", bias.to(dtype))

    channels = mask.mlp.bool().cpu() if mask.mlp is not None else torch.ones(geom.intermediate_size, dtype=torch.bool)
    if channels.numel() != geom.intermediate_size:
        raise FlapDeployError(
            f"layer {i}: MLP mask has {channels.numel()} entries, the model has {geom.intermediate_size} channels"
        )
    cols = channels.nonzero().flatten()
    down_weight, down_bias = _out_proj(m.down_proj, cols, means.mlp if means else None, refit.mlp if refit else None, i)
    if cols.numel():
        put(prefix + "post_attention_layernorm.weight", m.post_attention_layernorm.weight.detach())
        for name, proj in (("gate_proj", m.gate_proj), ("up_proj", m.up_proj)):
            put(prefix + f"mlp.{name}.weight", proj.weight.detach()[cols])
            if proj.bias is not None:
                put(prefix + f"mlp.{name}.bias", proj.bias.detach()[cols])
        put(prefix + "mlp.down_proj.weight", down_weight)
    if with_down_bias:
        bias = down_bias if down_bias is not None else torch.zeros(geom.hidden_size, dtype=torch.float64)
        put(prefix + "mlp.down_proj.bias", bias.to(dtype))

    out.widths.append(LayerWidths(heads=len(q_kept), kv_heads=len(kv_kept), mlp=int(cols.numel())))


def flap_config(source_config: Any, widths: list[LayerWidths], *, o_proj_bias: bool, down_proj_bias: bool,
                provenance: dict | None = None) -> FlapLlamaConfig:
    """The FlapLlama config of a source config with the given per-layer widths."""
    adapter = get_adapter(source_config)
    geom = adapter.geometry(source_config)
    fields = {k: v for k, v in source_config.to_dict().items() if k not in _DROPPED_KEYS}
    q = [w.heads for w in widths]
    kv = [w.kv_heads for w in widths]
    mlp = [w.mlp for w in widths]
    fields.update(
        architectures=["FlapLlamaForCausalLM"],
        head_dim=geom.head_dim,
        num_attention_heads_per_layer=q,
        num_key_value_heads_per_layer=kv,
        intermediate_size_per_layer=mlp,
        num_attention_heads=max(max(q), 1),
        num_key_value_heads=max(max(kv), 1),
        intermediate_size=max(max(mlp), 1),
        attention_bias=bool(adapter.qkv_bias(source_config)),
        mlp_bias=bool(adapter.mlp_bias(source_config)),
        o_proj_bias=o_proj_bias,
        down_proj_bias=down_proj_bias,
        qk_norm=adapter.qk_norm,
        sliding_window=adapter.sliding_window(source_config),
    )
    flap = dict(provenance or {})
    flap.setdefault("source_architecture", adapter.architecture)
    flap.setdefault(
        "source_config",
        {
            "num_attention_heads": geom.num_heads,
            "num_key_value_heads": geom.num_kv_heads,
            "intermediate_size": geom.intermediate_size,
            "head_dim": geom.head_dim,
        },
    )
    fields["flap"] = flap
    return FlapLlamaConfig(**fields)


@torch.no_grad()
def compress(
    model: nn.Module,
    masks: list[LayerMask],
    means: list[LayerMeans] | None = None,
    provenance: dict | None = None,
    refits: list[LayerRefit | None] | None = None,
) -> FlapLlamaForCausalLM:
    """Slice a dense model by per-layer keep-masks into a FlapLlamaForCausalLM.

    With ``means`` (calibration means of the o_proj / down_proj inputs), the output of the
    pruned channels is replaced by its mean through the o_proj / down_proj biases. With
    ``refits`` (``reconstruct.refit_layer``), a layer's refitted o_proj / down_proj replace
    the sliced ones and their compensation.
    The dense model is left untouched; the result shares no storage with it.
    """
    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)
    if len(masks) != geom.num_layers:
        raise FlapDeployError(f"got {len(masks)} layer masks for a model with {geom.num_layers} layers")
    if means is not None and len(means) != geom.num_layers:
        raise FlapDeployError(f"got {len(means)} layer means for a model with {geom.num_layers} layers")
    if refits is not None and len(refits) != geom.num_layers:
        raise FlapDeployError(f"got {len(refits)} layer refits for a model with {geom.num_layers} layers")

    first = adapter.layer_modules(model, 0)
    with_o_bias = (means is not None or first.o_proj.bias is not None
                   or any(r is not None and r.attn is not None for r in refits or ()))
    with_down_bias = (means is not None or first.down_proj.bias is not None
                      or any(r is not None and r.mlp is not None for r in refits or ()))
    sliced = _Sliced()
    for i in range(geom.num_layers):
        _slice_layer(adapter, model, i, geom, masks[i], means[i] if means else None, refits[i] if refits else None,
                     sliced, with_o_bias, with_down_bias)

    config = flap_config(model.config, sliced.widths, o_proj_bias=with_o_bias, down_proj_bias=with_down_bias,
                         provenance=provenance)
    config.dtype = model.dtype

    state = {name: t.clone() for name, t in sliced.tensors.items()}
    state["model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().clone()
    state["model.norm.weight"] = model.model.norm.weight.detach().clone()
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    else:
        state["lm_head.weight"] = model.lm_head.weight.detach().clone()

    with init_empty_weights(include_buffers=False):
        pruned = FlapLlamaForCausalLM(config)
    pruned.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        pruned.lm_head.weight = pruned.model.embed_tokens.weight
    return pruned.eval()
