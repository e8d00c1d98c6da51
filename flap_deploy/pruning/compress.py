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

from flap_deploy.errors import FlapDeployError
from flap_deploy.model.adapters import Geometry, LayerModules, get_adapter
from flap_deploy.model.config import flap_config
from flap_deploy.model.layout import (
    LayerMask,
    head_columns,
    kept_head_order,
    layer_widths,
    mlp_channels,
)
from flap_deploy.model.modeling_flap_llama import FlapLlamaConfig, FlapLlamaForCausalLM
from flap_deploy.pruning.reconstruct import LayerRefit, Refit

if TYPE_CHECKING:
    from flap_deploy.streaming.layers import LayerStream


@dataclass
class LayerMeans:
    """Calibration means of the inputs of o_proj ([heads * head_dim]) and down_proj ([intermediate])."""

    attn: torch.Tensor | None = None
    mlp: torch.Tensor | None = None


def _compensation(weight: torch.Tensor, kept: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor | None:
    """W[:, pruned] @ mean[pruned] in float64, or None without means."""
    if mean is None:
        return None
    pruned = torch.ones(weight.shape[1], dtype=torch.bool)
    pruned[kept] = False
    return weight[:, pruned.to(weight.device)].double() @ mean.double().to(weight.device)[pruned]  # no float64 W


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
    q_rows, kv_rows = head_columns(q_kept, hd), head_columns(kv_kept, hd)
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

    cols = mlp_channels(mask, geom, i).nonzero().flatten()
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
    from flap_deploy.io.shards import ShardWriter
    from flap_deploy.model.contract import expected_tensor_shapes

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
