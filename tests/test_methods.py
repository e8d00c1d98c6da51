"""A pruning method is one entry of ``methods.METHODS`` (its scorer beside it): a method added to the table
alone prunes end to end through the unchanged pipeline, is validated, recorded and offered by the CLI."""

import pytest
import torch

from factories import VOCAB, masked_dense_logits, small, tiny_dense
from flap_deploy import prune
from flap_deploy.errors import ParameterError
from flap_deploy.pruning.methods import METHODS, Method, Scores


def score_random(stream, config, calib, statistics, align, plan) -> Scores:
    """Seeded random unit scores: no calibration, no weights read."""
    g = torch.Generator().manual_seed(config.seed)
    geom = stream.geometry
    return Scores(attn=[torch.rand(geom.num_heads, generator=g, dtype=torch.float64) for _ in range(geom.num_layers)],
                  mlp=[torch.rand(geom.intermediate_size, generator=g, dtype=torch.float64)
                       for _ in range(geom.num_layers)])


RANDOM = Method("random", "random unit scores, uniform per layer", score_random, calibrates=False, adaptive=False,
                compensates=False, metric="random")


def test_a_method_added_to_the_table_alone_prunes_end_to_end_and_is_recorded(monkeypatch):
    monkeypatch.setitem(METHODS, RANDOM.name, RANDOM)
    dense = tiny_dense("llama")
    result = prune(dense, small(ratio=0.3, method="random"))
    p = result.provenance
    assert (p["method"], p["metric"], p["structure"], p["attn_ratio"]) == ("random", "random", "UL-UM", None)
    assert p["reconstruction"]["mode"] == "none" and not p["bias_compensation"] and p["calibration"] is None
    assert abs(p["achieved_ratio"] - 0.3) <= 0.01
    assert result.memory["plan"]["covariance_bytes"] == 0 and result.statistics is None
    c = result.model.config
    assert len(set(c.num_attention_heads_per_layer)) == 1  # uniform per layer, as the entry says
    x = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        pruned = result.model(input_ids=x, use_cache=False).logits
    torch.testing.assert_close(pruned, masked_dense_logits(dense, result, x), rtol=0, atol=1e-4)


def test_a_method_outside_the_table_is_refused_by_the_validator(monkeypatch):
    with pytest.raises(ParameterError) as e:
        small(method="random").validate()
    assert e.value.param == "method" and "'random' is not one of flap" in str(e.value)
    monkeypatch.setitem(METHODS, RANDOM.name, RANDOM)
    small(method="random").validate()


def test_the_cli_method_choices_and_help_are_the_table():
    from flap_deploy_cli import main

    option = next(p for p in main.commands["prune"].params if p.name == "method")
    assert tuple(option.type.choices) == tuple(METHODS)
    assert all(f"{m.name}: {m.help}" in option.help for m in METHODS.values())
