import pytest
import torch

from factories import VOCAB, masked_dense_logits, small, tiny_dense
from flap_deploy import prune
from flap_deploy.model.adapters import get_adapter
from flap_deploy.pruning.config import STRUCTURES
from flap_deploy.pruning.statistics import calibrate_layers
from flap_deploy.pruning.stats import ChannelStats
from flap_deploy.streaming.layers import hooks

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def ids(n=6, seqlen=20, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_statistics_equal_a_full_forward(family):
    """Feeding each layer the previous dense outputs gives the statistics of the o_proj and
    down_proj inputs of one ordinary forward over the whole batch."""
    model = tiny_dense(family)
    adapter = get_adapter(model.config)
    x = ids()
    captured = {}
    capture = [(mod, lambda mod, args, k=(i, key): captured.__setitem__(k, args[0].detach().clone()))
               for i in range(model.config.num_hidden_layers)
               for key, mod in zip(("attn", "mlp"), (adapter.layer_modules(model, i).o_proj,
                                                     adapter.layer_modules(model, i).down_proj))]
    with torch.no_grad(), hooks(*capture):
        model(input_ids=x, use_cache=False)

    streamed = {}
    calibrate_layers(model, x, lambda i, s: streamed.__setitem__(i, s), batch_size=4, progress=False)
    for (i, key), inp in captured.items():
        flat = inp.reshape(-1, inp.shape[-1]).double()
        stats: ChannelStats = getattr(streamed[i], key)
        torch.testing.assert_close(stats.mean, flat.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.var, flat.var(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kw", [dict(), dict(reconstruct="none"), dict(attn_granularity="head", structure="AL-MM"),
                                dict(method="wanda-sp"), dict(method="mag-sp")],
                         ids=["flap", "no-bias", "head-AL-MM", "wanda-sp", "mag-sp"])
def test_masking_equivalence(family, kw):
    dense = tiny_dense(family)
    result = prune(dense, small(ratio=0.35, **kw))
    assert result.achieved_ratio > 0.3
    x = ids(3, 16, seed=5)
    with torch.no_grad():
        pruned = result.model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(pruned, masked_dense_logits(dense, result, x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("granularity", ["group", "head"])
def test_each_structure_hits_the_target_on_a_tiny_model(structure, granularity):
    dense = tiny_dense("llama")
    for ratio in (0.2, 0.5):
        result = prune(dense, small(ratio=ratio, structure=structure, attn_granularity=granularity))
        p = result.provenance
        assert abs(p["achieved_ratio"] - ratio) <= 0.005, (ratio, p["achieved_ratio"])
        assert p["pruned_linear_weights"] == round((1 - p["achieved_ratio"]) * p["dense_linear_weights"])


def test_tp_and_mlp_alignment_hold_on_every_layer():
    dense = tiny_dense("llama")  # 8 query heads, 2 KV heads, MLP 96
    result = prune(dense, small(ratio=0.3, tp_size=4, mlp_multiple=8, attn_granularity="head"))
    c = result.model.config
    for q, kv, mlp in zip(c.num_attention_heads_per_layer, c.num_key_value_heads_per_layer,
                          c.intermediate_size_per_layer):
        assert q % 4 == 0 and mlp % 8 == 0
        assert q == 0 or kv % 4 == 0 or 4 % kv == 0
    assert result.provenance["alignment"] == {"mlp_multiple": 8, "tp_size": 4}


def test_same_seed_same_masks_bit_for_bit():
    dense = tiny_dense("qwen2")
    a = prune(dense, small(ratio=0.4, seed=3, reconstruct="bias"))
    b = prune(dense, small(ratio=0.4, seed=3, reconstruct="bias"))
    c = prune(dense, small(ratio=0.4, seed=4, reconstruct="bias"))
    for x, y in zip(a.masks, b.masks):
        assert torch.equal(x.heads, y.heads) and torch.equal(x.mlp, y.mlp)
    for x, y in zip(a.means, b.means):
        assert torch.equal(x.attn, y.attn) and torch.equal(x.mlp, y.mlp)
    assert any(not torch.equal(x.attn, y.attn) for x, y in zip(a.means, c.means))


def test_reused_statistics_give_the_same_model():
    dense = tiny_dense("llama")
    first = prune(dense, small(ratio=0.3))
    again = prune(dense, small(ratio=0.3), statistics=first.statistics)
    for x, y in zip(first.masks, again.masks):
        assert torch.equal(x.heads, y.heads) and torch.equal(x.mlp, y.mlp)


def test_provenance_records_the_recipe_calibration_source_and_sizes():
    dense = tiny_dense("mistral")
    p = prune(dense, small(ratio=0.25, calib="self", seed=7)).provenance
    for key in ("method", "metric", "structure", "target_ratio", "achieved_ratio", "calibration", "source_model",
                "source_architecture", "dense_params", "pruned_params", "alignment", "package_version"):
        assert key in p, key
    assert p["calibration"] == {"source": "self", "samples": 12, "seqlen": 24, "seed": 7}
    assert p["source_architecture"] == "MistralForCausalLM"
    assert p["pruned_params"] < p["dense_params"]
