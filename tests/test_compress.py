"""The compression primitive on tiny random models of every supported family."""

import pytest
import torch

from factories import FAMILY_CONFIGS, tiny_dense
from flap_deploy.model.adapters import get_adapter
from flap_deploy.model.layout import LayerMask
from flap_deploy.pruning.compress import LayerMeans, compress
from flap_deploy.errors import FlapDeployError
from flap_deploy.streaming.layers import hooks

FAMILIES = sorted(FAMILY_CONFIGS)


def _ids(batch=2, seq=9, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_all_true_masks_reproduce_dense_logits(family):
    dense = tiny_dense(family)
    pruned = compress(dense, [LayerMask()] * dense.config.num_hidden_layers)
    ids = _ids()
    with torch.no_grad():
        diff = (pruned(ids).logits - dense(ids).logits).abs().max().item()
    assert diff <= 1e-5


def _random_masks_and_means(dense, seed):
    g = torch.Generator().manual_seed(seed)
    geom = get_adapter(dense.config).geometry(dense.config)
    masks, means = [], []
    for i in range(geom.num_layers):
        groups = torch.rand(geom.num_kv_heads, generator=g) < 0.6
        groups[i % geom.num_kv_heads] = True  # keep at least one group
        per_group = torch.zeros(geom.group_size, dtype=torch.bool)
        per_group[: max(1, geom.group_size // 2)] = True
        heads = (groups[:, None] & per_group[None, :]).flatten()
        mlp = torch.rand(geom.intermediate_size, generator=g) < 0.7
        masks.append(LayerMask(heads=heads, mlp=mlp))
        means.append(LayerMeans(attn=torch.randn(geom.num_heads * geom.head_dim, generator=g),
                                mlp=torch.randn(geom.intermediate_size, generator=g)))
    return geom, masks, means


def _dense_with_means(dense, geom, masks, means):
    """Hooks that replace the pruned input channels of o_proj / down_proj by their means (for ``hooks``)."""
    adapter = get_adapter(dense.config)
    replaced = []
    for i, (mask, mean) in enumerate(zip(masks, means)):
        mods = adapter.layer_modules(dense, i)
        head_keep = mask.heads.repeat_interleave(geom.head_dim)
        for module, keep, mu in ((mods.o_proj, head_keep, mean.attn), (mods.down_proj, mask.mlp, mean.mlp)):
            def hook(_m, args, keep=keep, mu=mu):
                x = args[0]
                return (torch.where(keep, x, mu.to(x.dtype)),)
            replaced.append((module, hook))
    return replaced


@pytest.mark.parametrize("family", FAMILIES)
def test_random_masks_with_compensation_equal_mean_replacement(family):
    dense = tiny_dense(family, seed=1)
    geom, masks, means = _random_masks_and_means(dense, seed=3)
    pruned = compress(dense, masks, means)
    ids = _ids(seed=1)
    with torch.no_grad():
        got = pruned(ids).logits
        with hooks(*_dense_with_means(dense, geom, masks, means)):
            want = dense(ids).logits
    assert (got - want).abs().max().item() <= 1e-4
    # and the model really is smaller
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())


def test_whole_module_removal_keeps_its_mean_as_constant():
    dense = tiny_dense("llama", seed=2)
    geom = get_adapter(dense.config).geometry(dense.config)
    masks = [LayerMask(heads=torch.zeros(geom.num_heads, dtype=torch.bool)),
             LayerMask(mlp=torch.zeros(geom.intermediate_size, dtype=torch.bool)), LayerMask()]
    means = [LayerMeans(attn=torch.randn(geom.num_heads * geom.head_dim), mlp=torch.randn(geom.intermediate_size))
             for _ in range(3)]
    pruned = compress(dense, masks, means)
    assert pruned.config.num_attention_heads_per_layer == [0, 8, 8]
    assert pruned.config.intermediate_size_per_layer == [96, 0, 96]
    ids = _ids()
    with torch.no_grad():
        got = pruned(ids).logits
        with hooks(*_dense_with_means(dense, geom, [
                LayerMask(heads=masks[0].heads, mlp=torch.ones(96, dtype=torch.bool)),
                LayerMask(heads=torch.ones(8, dtype=torch.bool), mlp=masks[1].mlp),
                LayerMask(heads=torch.ones(8, dtype=torch.bool), mlp=torch.ones(96, dtype=torch.bool))], means)):
            want = dense(ids).logits
    assert (got - want).abs().max().item() <= 1e-4


def test_unequal_heads_per_group_is_rejected():
    dense = tiny_dense("llama")
    heads = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)  # 3 heads in group 0, 1 in group 1
    with pytest.raises(FlapDeployError, match="layer 0: kept query heads per KV group differ"):
        compress(dense, [LayerMask(heads=heads), LayerMask(), LayerMask()])


def test_mask_count_must_match_layers():
    dense = tiny_dense("qwen2")
    with pytest.raises(FlapDeployError, match="2 layer masks for a model with 3 layers"):
        compress(dense, [LayerMask()] * 2)
