import math

import pytest
import torch

from flap_deploy.model.adapters import Geometry
from flap_deploy.pruning.config import STRUCTURES
from flap_deploy.pruning.allocation import Alignment, allocate, attention_menu, dense_layer_cost
from flap_deploy.errors import FlapDeployError

GEOM = Geometry(hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=16, intermediate_size=256)


def scores(seed: int = 0, geom: Geometry = GEOM):
    g = torch.Generator().manual_seed(seed)
    # Layers of different importance, so that adaptive structures give them different widths.
    attn = [torch.randn(geom.num_heads, generator=g, dtype=torch.float64) + 0.3 * i for i in range(geom.num_layers)]
    mlp = [torch.randn(geom.intermediate_size, generator=g, dtype=torch.float64) - 0.2 * i
           for i in range(geom.num_layers)]
    return attn, mlp


def kept_cost(masks, geom: Geometry) -> int:
    total = 0
    for m in masks:
        groups = m.heads.view(geom.num_kv_heads, geom.group_size)
        kv = int(groups.any(dim=1).sum())
        total += (2 * int(m.heads.sum()) + 2 * kv) * geom.head_dim * geom.hidden_size
        total += 3 * geom.hidden_size * int(m.mlp.sum())
    return total


def check_layers(masks, geom: Geometry, align: Alignment) -> None:
    for i, m in enumerate(masks):
        groups = m.heads.view(geom.num_kv_heads, geom.group_size)
        sizes = {int(s) for s in groups.sum(dim=1) if s > 0}
        assert len(sizes) <= 1, f"layer {i}: unequal group sizes {sizes}"
        q, kv = int(m.heads.sum()), int(groups.any(dim=1).sum())
        width = int(m.mlp.sum())
        t = align.tp_size
        assert q % t == 0, f"layer {i}: {q} query heads, tp {t}"
        assert q == 0 or kv % t == 0 or t % kv == 0, f"layer {i}: {kv} KV heads, tp {t}"
        assert width % math.lcm(align.mlp_multiple, t) == 0, f"layer {i}: MLP width {width}"


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("granularity", ["group", "head"])
@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 0.8])
@pytest.mark.parametrize("align", [Alignment(), Alignment(mlp_multiple=8, tp_size=2), Alignment(tp_size=4)],
                         ids=["free", "mlp8-tp2", "tp4"])
def test_target_ratio_and_alignment(structure, granularity, ratio, align):
    attn, mlp = scores()
    alloc = allocate(attn, mlp, GEOM, ratio=ratio, structure=structure, granularity=granularity, align=align)
    assert alloc.kept_cost == kept_cost(alloc.masks, GEOM)
    assert abs(alloc.achieved_ratio - ratio) <= 0.005
    check_layers(alloc.masks, GEOM, align)


def test_adaptive_structure_varies_widths_and_uniform_does_not():
    attn, mlp = scores()
    adaptive = allocate(attn, mlp, GEOM, ratio=0.4, structure="AL-AM")
    uniform = allocate(attn, mlp, GEOM, ratio=0.4, structure="UL-UM")
    assert len({int(m.mlp.sum()) for m in adaptive.masks}) > 1
    widths = {int(m.mlp.sum()) for m in uniform.masks}
    assert max(widths) - min(widths) <= 1  # only the carried rounding differs


def test_al_am_is_one_global_threshold_over_mlp_channels():
    """Without alignment, every kept MLP channel (any layer) outscores every removed one."""
    attn, mlp = scores(3)
    alloc = allocate(attn, mlp, GEOM, ratio=0.3, structure="AL-AM")
    kept = torch.cat([s[m.mlp] for s, m in zip(mlp, alloc.masks)])
    removed = torch.cat([s[~m.mlp] for s, m in zip(mlp, alloc.masks)])
    assert kept.min() >= removed.max()


def test_group_unit_scores_the_mean_of_its_query_heads():
    """A KV group is kept over another when its query heads' mean score is higher."""
    head = torch.tensor([5.0, -5.0, -5.0, -5.0, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64)  # means -2.5 vs 0.5
    attn = [head] * GEOM.num_layers
    mlp = [torch.zeros(GEOM.intermediate_size, dtype=torch.float64)] * GEOM.num_layers
    attn_dense, mlp_dense = dense_layer_cost(GEOM)
    ratio = 0.5 * attn_dense / (attn_dense + mlp_dense)  # exactly one group per layer
    alloc = allocate(attn, mlp, GEOM, ratio=ratio, structure="UL-MM", attn_ratio=0.5)
    for m in alloc.masks:
        assert m.heads.tolist() == [False] * 4 + [True] * 4


def test_head_granularity_keeps_equal_group_sizes():
    head = torch.tensor([3.0, 2.0, -9.0, -9.0, 1.0, 0.0, -9.0, -9.0], dtype=torch.float64)
    menu = attention_menu(0, head, GEOM, Alignment(), "head")
    # 2 groups x 2 heads is an option, keeping the two best heads of each group.
    opt = [i for i in range(len(menu.units)) if menu.units[i] == 4 and menu.kv[i] == 2]
    assert menu.mask_of(opt[0]).tolist() == [True, True, False, False, True, True, False, False]


def test_alignment_that_only_width_zero_satisfies_is_an_error():
    geom = Geometry(hidden_size=576, num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536)
    attn, mlp = scores(0, geom)
    with pytest.raises(FlapDeployError, match="tp_size=16"):
        allocate(attn, mlp, geom, ratio=0.2, align=Alignment(tp_size=16))
    with pytest.raises(FlapDeployError, match="mlp_multiple=2048"):
        allocate(attn, mlp, geom, ratio=0.2, align=Alignment(mlp_multiple=2048))
