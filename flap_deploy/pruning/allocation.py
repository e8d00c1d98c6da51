"""Width allocation: from per-unit scores to per-layer keep-masks at an exact parameter budget.

Each layer's attention and MLP is a *menu* of allowed widths (the alignment rules decide which
widths are allowed). Every option of a menu keeps the best-scoring units for its width and has
a value (the sum of the kept units' scores), a unit count and a parameter cost.

* Adaptive structures (AL-*) use FLAP's single threshold ``t`` on standardized scores: a unit is
  worth keeping when its score exceeds ``t``, so each menu picks the option maximizing
  ``value - t * units``; ``t`` is bisected until the kept cost is the target. With unit-wide
  menus this is exactly the paper's rule (keep a unit iff its score > t, t set by the
  cost-weighted cumulative sum); with aligned menus it keeps whole blocks of units.
  The attention choice is fixed first and the fine-grained MLP then absorbs the rounding,
  so the achieved ratio lands within half an MLP block of the target.
* Uniform structures (UL-*) give every layer the option whose cost is closest to the target.

Cost = weights of q/k/v/o and gate/up/down, from real shapes (GQA included): an attention
option of ``k`` KV groups with ``h`` query heads each costs ``k * (2h + 2) * head_dim * hidden``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from flap_deploy.errors import FlapDeployError
from flap_deploy.model.adapters import Geometry
from flap_deploy.model.layout import LayerMask
from flap_deploy.model.params import layer_linear_params
from flap_deploy.model.tp import layer_tp_problem
from flap_deploy.pruning.choices import GRANULARITIES, STRUCTURES


@dataclass
class Alignment:
    """Width rules: MLP widths a multiple of ``mlp_multiple``; with ``tp_size`` > 1, the widths
    vLLM can shard (``tp.layer_tp_problem``; the MLP step is a multiple of ``tp_size``)."""

    mlp_multiple: int = 1
    tp_size: int = 1

    def heads_ok(self, q: int, kv: int) -> bool:
        return layer_tp_problem(q, kv, 0, self.tp_size) is None

    @property
    def mlp_step(self) -> int:
        return math.lcm(self.mlp_multiple, self.tp_size)

    def to_dict(self) -> dict[str, int]:
        return {"mlp_multiple": self.mlp_multiple, "tp_size": self.tp_size}


@dataclass
class Menu:
    """The allowed widths of one module (attention or MLP) of one layer, ascending by units."""

    layer: int
    kind: str  # "attn" | "mlp"
    units: torch.Tensor  # int64 [options]: query heads or channels kept
    value: torch.Tensor  # float64 [options]: sum of kept units' scores
    cost: torch.Tensor  # int64 [options]: linear weights kept
    mask_of: Callable[[int], torch.Tensor] = field(repr=False)
    kv: torch.Tensor | None = None  # attention: KV heads kept per option

    def by_threshold(self, t: float) -> int:
        return int(torch.argmax(self.value - t * self.units.double()))

    def by_cost(self, target: float) -> int:
        """Option whose cost is closest to ``target``; among equals, the highest value."""
        gap = (self.cost.double() - target).abs()
        best = gap == gap.min()
        value = torch.where(best, self.value, torch.full_like(self.value, -math.inf))
        return int(torch.argmax(value))


def attention_menu(layer: int, head_scores: torch.Tensor, geom: Geometry, align: Alignment,
                   granularity: str) -> Menu:
    """Options (k KV groups, h query heads per group); ``group`` granularity has h = group size only."""
    g, nkv = geom.group_size, geom.num_kv_heads
    s = head_scores.double().view(nkv, g)
    options = [(0, 0, 0.0, None)]  # (kv, heads per group, value, mask)
    sizes = range(1, g + 1) if granularity == "head" else [g]
    for h in sizes:
        top_val, top_idx = torch.sort(s, dim=1, descending=True, stable=True)
        group_val = top_val[:, :h].sum(dim=1)
        order = torch.sort(group_val, descending=True, stable=True).indices
        csum = torch.cumsum(group_val[order], 0)
        for k in range(1, nkv + 1):
            if not align.heads_ok(k * h, k):
                continue
            mask = torch.zeros(nkv, g, dtype=torch.bool)
            for grp in order[:k].tolist():
                mask[grp, top_idx[grp, :h]] = True
            options.append((k, h, float(csum[k - 1]), mask.flatten()))
    if len(options) == 1:
        raise FlapDeployError(
            f"alignment tp_size={align.tp_size}: no non-zero attention width satisfies it "
            f"({geom.num_heads} query heads, {geom.num_kv_heads} KV heads per layer)"
        )
    options.sort(key=lambda o: (o[0] * o[1], o[0]))
    masks = [o[3] if o[3] is not None else torch.zeros(geom.num_heads, dtype=torch.bool) for o in options]
    return Menu(
        layer=layer, kind="attn",
        units=torch.tensor([o[0] * o[1] for o in options], dtype=torch.long),
        value=torch.tensor([o[2] for o in options], dtype=torch.float64),
        cost=torch.tensor([layer_linear_params(geom.hidden_size, geom.head_dim, o[0] * o[1], o[0], 0) for o in options],
                          dtype=torch.long),
        mask_of=lambda i: masks[i],
        kv=torch.tensor([o[0] for o in options], dtype=torch.long),
    )


def mlp_menu(layer: int, channel_scores: torch.Tensor, geom: Geometry, align: Alignment) -> Menu:
    """Options: the top-w channels for every allowed width w (multiples of the alignment step)."""
    step = align.mlp_step
    n = geom.intermediate_size
    if step > n:
        raise FlapDeployError(
            f"alignment mlp_multiple={align.mlp_multiple}, tp_size={align.tp_size}: no non-zero MLP width "
            f"satisfies it (the MLP has {n} channels)"
        )
    order = torch.sort(channel_scores.double(), descending=True, stable=True).indices
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(channel_scores.double()[order], 0)])
    widths = torch.arange(0, n + 1, step)

    def mask_of(i: int) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[: int(widths[i])]] = True
        return mask

    return Menu(layer=layer, kind="mlp", units=widths, value=prefix[widths],
                cost=torch.tensor([layer_linear_params(geom.hidden_size, geom.head_dim, 0, 0, int(w)) for w in widths],
                                  dtype=torch.long), mask_of=mask_of)


def fit_threshold(menus: list[Menu], target: float) -> list[int]:
    """Choices of one global threshold whose total kept cost is closest to ``target``."""
    if not menus:
        return []
    # Beyond +-bound every menu keeps all (t = -bound) or nothing (t = +bound): options differ
    # by at least one unit and their values by at most twice the largest |value|.
    bound = 2 * max(float(m.value.abs().max()) for m in menus) + 1.0
    lo, hi = -bound, bound

    def choose(t: float) -> tuple[list[int], int]:
        picks = [m.by_threshold(t) for m in menus]
        return picks, sum(int(m.cost[p]) for m, p in zip(menus, picks))

    lo_pick, lo_cost = choose(lo)
    hi_pick, hi_cost = choose(hi)
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        pick, cost = choose(mid)
        if cost > target:
            lo, lo_pick, lo_cost = mid, pick, cost
        else:
            hi, hi_pick, hi_cost = mid, pick, cost
    return lo_pick if abs(lo_cost - target) <= abs(hi_cost - target) else hi_pick


def dense_layer_cost(geom: Geometry) -> tuple[int, int]:
    """(attention, MLP) linear weights of one dense layer."""
    attn = layer_linear_params(geom.hidden_size, geom.head_dim, geom.num_heads, geom.num_kv_heads, 0)
    return attn, layer_linear_params(geom.hidden_size, geom.head_dim, 0, 0, geom.intermediate_size)


@dataclass
class Allocation:
    """Per-layer masks, and the menus and choices (option indices) they come from: a width search starts
    from them (``search``)."""

    masks: list[LayerMask]
    dense_cost: int
    kept_cost: int
    attn_menus: list[Menu] = field(default_factory=list, repr=False)
    mlp_menus: list[Menu] = field(default_factory=list, repr=False)
    picks: list[tuple[int, int]] = field(default_factory=list)  # (attention, MLP) option of every layer

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.kept_cost / self.dense_cost


def allocate(attn_scores: list[torch.Tensor], mlp_scores: list[torch.Tensor], geom: Geometry, *,
             ratio: float, structure: str = "AL-AM", attn_ratio: float | None = None,
             granularity: str = "group", align: Alignment | None = None) -> Allocation:
    """Per-layer masks removing ``ratio`` of the decoder's linear weights.

    ``attn_scores[i]``: one score per query head of layer i; ``mlp_scores[i]``: one per MLP channel.
    ``attn_ratio``: the fraction of attention weights removed by the manual-module structures
    (UL-MM, AL-MM); the MLP takes the rest of the budget.
    """
    if structure not in STRUCTURES:
        raise FlapDeployError(f"unknown structure '{structure}'; choose from {', '.join(STRUCTURES)}")
    if granularity not in GRANULARITIES:
        raise FlapDeployError(f"unknown attention granularity '{granularity}'; choose from {', '.join(GRANULARITIES)}")
    align = align or Alignment()
    L = geom.num_layers
    attn_dense, mlp_dense = dense_layer_cost(geom)
    layer_dense = attn_dense + mlp_dense
    total = L * layer_dense
    target = (1 - ratio) * total
    a_ratio = ratio if attn_ratio is None else attn_ratio
    attn = [attention_menu(i, attn_scores[i], geom, align, granularity) for i in range(L)]
    mlp = [mlp_menu(i, mlp_scores[i], geom, align) for i in range(L)]

    if structure.startswith("UL"):
        a_ratio = ratio if structure == "UL-UM" else a_ratio
        a_pick = [m.by_cost((1 - a_ratio) * attn_dense) for m in attn]
        # Each layer's MLP takes the rest of the layer's budget; the rounding left by aligned
        # widths is carried to the next layer so that the total stays on target.
        m_pick, carry = [], 0.0
        for i in range(L):
            want = (1 - ratio) * layer_dense - int(attn[i].cost[a_pick[i]]) + carry
            m_pick.append(mlp[i].by_cost(want))
            carry = want - int(mlp[i].cost[m_pick[-1]])
    else:
        if structure == "AL-AM":
            a_pick = fit_threshold(attn + mlp, target)[:L]
        else:  # AL-MM: attention budget set manually, adaptive across layers inside each module
            a_pick = fit_threshold(attn, (1 - a_ratio) * L * attn_dense)
        attn_kept = sum(int(m.cost[p]) for m, p in zip(attn, a_pick))
        m_pick = fit_threshold(mlp, target - attn_kept)

    return chosen(attn, mlp, list(zip(a_pick, m_pick)), total)


def chosen(attn: list[Menu], mlp: list[Menu], picks: list[tuple[int, int]], dense_cost: int) -> Allocation:
    """The allocation of one (attention, MLP) option per layer."""
    masks = [LayerMask(heads=attn[i].mask_of(a), mlp=mlp[i].mask_of(m)) for i, (a, m) in enumerate(picks)]
    kept = sum(int(attn[i].cost[a]) + int(mlp[i].cost[m]) for i, (a, m) in enumerate(picks))
    return Allocation(masks=masks, dense_cost=dense_cost, kept_cost=kept, attn_menus=attn, mlp_menus=mlp,
                      picks=list(picks))
