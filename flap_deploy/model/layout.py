"""Which units of a layer survive: keep-masks, the widths they keep, and their rows and columns.

Every runtime's tensors follow from these: a query head ``h`` owns rows ``h*head_dim .. (h+1)*head_dim`` of
q_proj (columns of o_proj), a KV head the same rows of k_proj / v_proj, an MLP channel one row of gate/up
and one column of down_proj.
"""

from __future__ import annotations

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


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


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
