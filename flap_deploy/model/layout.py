"""Which units of a layer survive: keep-masks, the widths they keep, and their rows and columns.

Every runtime's tensors follow from these: a query head ``h`` owns rows ``h*head_dim .. (h+1)*head_dim`` of
q_proj (columns of o_proj), a KV head the same rows of k_proj / v_proj, an MLP channel one row of gate/up
and one column of down_proj.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flap_deploy.errors import FlapDeployError
from flap_deploy.model.adapters import Geometry


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


def head_columns(heads: Sequence[int] | torch.Tensor, head_dim: int) -> torch.Tensor:
    """The columns of o_proj (rows of q_proj, or of k_proj / v_proj for KV heads) that the given heads
    own, in the heads' order: the one head -> column expansion."""
    heads = torch.as_tensor(heads, dtype=torch.long).flatten().cpu()
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def kept_columns(mask: LayerMask, head_dim: int, attn_in: int, mlp_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_proj, down_proj) input columns a layer's mask keeps, ascending (None keeps all)."""
    attn = torch.arange(attn_in) if mask.heads is None else head_columns(mask.heads.bool().cpu().nonzero(), head_dim)
    mlp = torch.arange(mlp_in) if mask.mlp is None else mask.mlp.bool().cpu().nonzero().flatten()
    return attn, mlp


def layer_widths(mask: LayerMask, geom: Geometry, layer: int) -> LayerWidths:
    """The widths a mask keeps (no weights needed: they decide the pruned config before any slicing)."""
    heads = mask.heads if mask.heads is not None else torch.ones(geom.num_heads, dtype=torch.bool)
    q_kept, kv_kept = kept_head_order(heads, geom, layer)
    return LayerWidths(heads=len(q_kept), kv_heads=len(kv_kept), mlp=int(mlp_channels(mask, geom, layer).sum()))


def mlp_channels(mask: LayerMask, geom: Geometry, layer: int) -> torch.Tensor:
    channels = mask.mlp.bool().cpu() if mask.mlp is not None else torch.ones(geom.intermediate_size, dtype=torch.bool)
    if channels.numel() != geom.intermediate_size:
        raise FlapDeployError(
            f"layer {layer}: MLP mask has {channels.numel()} entries, the model has {geom.intermediate_size} channels"
        )
    return channels
