"""The single place that turns keep-masks into a smaller model.

Pruning algorithms only decide masks; ``compress`` slices a dense model of any supported
family into a ``FlapLlamaForCausalLM`` and, given calibration means, compensates what was
removed: ``b += W[:, pruned] @ mean[pruned]`` on o_proj and down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from torch import nn

from .adapters import Geometry, LayerModules, get_adapter
from .errors import FlapDeployError
from .modeling_flap_llama import FlapLlamaConfig, FlapLlamaForCausalLM

from .reconstruct import LayerRefit, Refit

if TYPE_CHECKING:
    from .streaming import LayerStream

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


def layer_widths(mask: LayerMask, geom: Geometry, layer: int) -> LayerWidths:
    """The widths a mask keeps (no weights needed: they decide the pruned config before any slicing)."""
    heads = mask.heads if mask.heads is not None else torch.ones(geom.num_heads, dtype=torch.bool)
    q_kept, kv_kept = kept_head_order(heads, geom, layer)
    return LayerWidths(heads=len(q_kept), kv_heads=len(kv_kept), mlp=int(_mlp_channels(mask, geom, layer).sum()))


def _mlp_channels(mask: LayerMask, geom: Geometry, layer: int) -> torch.Tensor:
    channels = mask.mlp.bool().cpu() if mask.mlp is not None else torch.ones(geom.intermediate_size, dtype=torch.bool)
    if channels.numel() != geom.intermediate_size:
        raise FlapDeployError(
            f"layer {layer}: MLP mask has {channels.numel()} entries, the model has {geom.intermediate_size} channels"
        )
    return channels


def _out_proj(linear: nn.Linear, kept: torch.Tensor, mean: torch.Tensor | None, refit: Refit | None,
              layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight of the kept columns, float64 bias or None) of o_proj / down_proj: the refit when
    given, else the sliced weight with the mean compensation (when means are given)."""
    if refit is None:
        weight = linear.weight.detach()
        return weight[:, kept.to(weight.device)], _bias(linear, _compensation(weight, kept, mean))
    if not torch.equal(refit.kept.cpu(), kept.cpu()):
        raise FlapDeployError(f"layer {layer}: the refit's kept columns differ from the mask's")
    return refit.weight.to(linear.weight.dtype), refit.bias


def slice_layer(m: LayerModules, i: int, geom: Geometry, mask: LayerMask, means: LayerMeans | None, *,
                with_o_bias: bool, with_down_bias: bool, refit: LayerRefit | None = None) -> dict[str, torch.Tensor]:
    """The contract tensors of layer ``i`` of the pruned model, from the dense layer's modules; a
    ``refit`` (``reconstruct``) replaces o_proj / down_proj and their compensation."""
    prefix = f"model.layers.{i}."
    dtype = m.q_proj.weight.dtype
    hd = geom.head_dim
    out: dict[str, torch.Tensor] = {}

    heads = mask.heads if mask.heads is not None else torch.ones(geom.num_heads, dtype=torch.bool)
    q_kept, kv_kept = kept_head_order(heads, geom, i)
    q_rows, kv_rows = _rows(q_kept, hd), _rows(kv_kept, hd)
    o_weight, o_bias = _out_proj(m.o_proj, q_rows, means.attn if means else None, refit.attn if refit else None, i)
    if q_kept:
        out[prefix + "input_layernorm.weight"] = m.input_layernorm.weight.detach()
        for name, proj, rows in (("q_proj", m.q_proj, q_rows), ("k_proj", m.k_proj, kv_rows), ("v_proj", m.v_proj, kv_rows)):
            out[prefix + f"self_attn.{name}.weight"] = proj.weight.detach()[rows.to(proj.weight.device)]
            if proj.bias is not None:
                out[prefix + f"self_attn.{name}.bias"] = proj.bias.detach()[rows.to(proj.bias.device)]
        out[prefix + "self_attn.o_proj.weight"] = o_weight
        if m.q_norm is not None:
            out[prefix + "self_attn.q_norm.weight"] = m.q_norm.weight.detach()
            out[prefix + "self_attn.k_norm.weight"] = m.k_norm.weight.detach()
    if with_o_bias:
        bias = o_bias if o_bias is not None else torch.zeros(geom.hidden_size, dtype=torch.float64)
        out[prefix + "self_attn.o_proj.bias"] = bias.to(dtype)

    cols = _mlp_channels(mask, geom, i).nonzero().flatten()
    down_weight, down_bias = _out_proj(m.down_proj, cols, means.mlp if means else None, refit.mlp if refit else None, i)
    if cols.numel():
        out[prefix + "post_attention_layernorm.weight"] = m.post_attention_layernorm.weight.detach()
        dev_cols = cols.to(m.down_proj.weight.device)
        for name, proj in (("gate_proj", m.gate_proj), ("up_proj", m.up_proj)):
            out[prefix + f"mlp.{name}.weight"] = proj.weight.detach()[dev_cols]
            if proj.bias is not None:
                out[prefix + f"mlp.{name}.bias"] = proj.bias.detach()[dev_cols]
        out[prefix + "mlp.down_proj.weight"] = down_weight
    if with_down_bias:
        bias = down_bias if down_bias is not None else torch.zeros(geom.hidden_size, dtype=torch.float64)
        out[prefix + "mlp.down_proj.bias"] = bias.to(dtype)
    return out


def compensation_biases(first: LayerModules, means: list[LayerMeans] | None,
                        refit: tuple[bool, bool] = (False, False)) -> tuple[bool, bool]:
    """Whether the pruned model carries o_proj / down_proj biases: compensation (means, or refits of
    that module), or the source's own."""
    return (means is not None or refit[0] or first.o_proj.bias is not None,
            means is not None or refit[1] or first.down_proj.bias is not None)


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
    """Slice an in-memory dense model by per-layer keep-masks into a FlapLlamaForCausalLM (in memory).

    With ``means`` (calibration means of the o_proj / down_proj inputs), the output of the
    pruned channels is replaced by its mean through the o_proj / down_proj biases.
    The dense model is left untouched; the result shares no storage with it. Pruning writes
    its result layer by layer instead (``pruning``); both slice with ``slice_layer``.
    """
    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)
    check_lengths(geom, masks, means)
    if refits is not None and len(refits) != geom.num_layers:
        raise FlapDeployError(f"got {len(refits)} layer refits for a model with {geom.num_layers} layers")
    refitted = (any(r is not None and r.attn is not None for r in refits or ()),
                any(r is not None and r.mlp is not None for r in refits or ()))
    o_bias, down_bias = compensation_biases(adapter.layer_modules(model, 0), means, refitted)
    widths = [layer_widths(masks[i], geom, i) for i in range(geom.num_layers)]
    state: dict[str, torch.Tensor] = {}
    for i in range(geom.num_layers):
        state.update(slice_layer(adapter.layer_modules(model, i), i, geom, masks[i], means[i] if means else None,
                                 with_o_bias=o_bias, with_down_bias=down_bias, refit=refits[i] if refits else None))
    config = flap_config(model.config, widths, o_proj_bias=o_bias, down_proj_bias=down_bias, provenance=provenance)
    config.dtype = model.dtype

    state = {name: t.clone() for name, t in state.items()}
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


def check_lengths(geom: Geometry, masks: list[LayerMask], means: list[LayerMeans] | None) -> None:
    if len(masks) != geom.num_layers:
        raise FlapDeployError(f"got {len(masks)} layer masks for a model with {geom.num_layers} layers")
    if means is not None and len(means) != geom.num_layers:
        raise FlapDeployError(f"got {len(means)} layer means for a model with {geom.num_layers} layers")


@torch.no_grad()
def compress_stream(stream: LayerStream, masks: list[LayerMask], means: list[LayerMeans] | None, out: Path, *,
                    provenance: dict | None = None, on_layer: Any = None,
                    refit: Any = None) -> FlapLlamaConfig:
    """Slice ``stream``'s layers one at a time and write the pruned weights into ``out`` as they come.

    The masks decide the pruned config first, and with it every tensor's name and shape (the
    checkpoint contract), so the shards are laid out before the first layer is read. Weights
    are written in the dtype the source stores them in. ``refit(i, modules)``, called while layer
    ``i`` is resident, returns its ``LayerRefit`` (the ``ls`` reconstruction, from held covariances or a second pass).
    Returns the config (not yet saved).
    """
    from .checkpoint import expected_tensor_shapes
    from .shards import ShardWriter

    geom = stream.geometry
    check_lengths(geom, masks, means)
    o_bias, down_bias = compensation_biases(stream.adapter.layer_modules(stream.model, 0), means,
                                            (refit is not None, refit is not None))
    widths = [layer_widths(masks[i], geom, i) for i in range(geom.num_layers)]
    config = flap_config(stream.model.config, widths, o_proj_bias=o_bias, down_proj_bias=down_bias,
                         provenance=provenance)
    dtype = stream.stored_dtype()
    config.dtype = dtype
    shapes = expected_tensor_shapes(config.to_dict())
    writer = ShardWriter(out, [(name, shape, dtype) for name, shape in shapes.items()])
    names = list(shapes)
    for name in names:
        if not name.startswith("model.layers."):
            writer.write(name, stream.stored_tensor(name).to(dtype))
    for i in range(geom.num_layers):
        with stream.layer(i):
            m = stream.adapter.layer_modules(stream.model, i)
            tensors = slice_layer(m, i, geom, masks[i], means[i] if means else None, with_o_bias=o_bias,
                                  with_down_bias=down_bias, refit=refit(i, m) if refit is not None else None)
            for name in (n for n in names if n.startswith(f"model.layers.{i}.")):
                writer.write(name, tensors[name].to(dtype))
        if on_layer is not None:
            on_layer(i)
    writer.close()
    return config
