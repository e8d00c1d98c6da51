"""The width search (``prune --search evo``): every candidate at the budget and alignment of FLAP's allocation,
never worse than its start, deterministic for a seed, and its fitness the KL of the checkpoint prune writes."""

from dataclasses import replace

import pytest
import torch
from factories import tiny_dense

from flap_deploy import PruneConfig, prune
from flap_deploy.errors import ParameterError
from flap_deploy.evaluation.perplexity import evaluate_windows
from flap_deploy.pruning.config import parse_budget
from flap_deploy.pruning.pipeline import collect_statistics

ALIGNMENTS = {"mlp multiple 8": dict(mlp_multiple=8), "tp 2, head granularity": dict(tp_size=2, attn_granularity="head")}


def config(**kw) -> PruneConfig:
    base = dict(ratio=0.3, nsamples=16, seqlen=24, batch_size=4, progress=False, search="evo", search_budget="40",
                search_windows=2)
    return PruneConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dense():
    return tiny_dense("llama")


@pytest.fixture(scope="module")
def searched(dense):
    return {name: prune(dense, config(**align)) for name, align in ALIGNMENTS.items()}


def kept_cost(allocation, picks) -> int:
    return sum(int(allocation.attn_menus[i].cost[a]) + int(allocation.mlp_menus[i].cost[m])
               for i, (a, m) in enumerate(picks))


@pytest.mark.parametrize("name", ALIGNMENTS)
def test_every_candidate_keeps_the_starts_budget_and_the_alignment(searched, name):
    result = searched[name].search
    alloc = result.allocation
    start = result.evaluated[0].picks
    mlp = alloc.mlp_menus[0]
    half_step = int(mlp.cost[1] - mlp.cost[0]) / 2
    align = ALIGNMENTS[name]
    step = max(align.get("mlp_multiple", 1), align.get("tp_size", 1))
    assert len({e.picks for e in result.evaluated}) > 5  # the search did move
    for e in result.evaluated:
        assert abs(kept_cost(alloc, e.picks) - kept_cost(alloc, start)) <= half_step, e.picks
        for i, (a, m) in enumerate(e.picks):
            assert int(alloc.mlp_menus[i].units[m]) % step == 0
            heads, kv = int(alloc.attn_menus[i].units[a]), int(alloc.attn_menus[i].kv[a])
            if "tp_size" in align and heads:
                assert heads % 2 == 0 and (kv % 2 == 0 or 2 % kv == 0)


@pytest.mark.parametrize("name", ALIGNMENTS)
def test_search_never_returns_a_worse_fitness_than_its_start(searched, name):
    record = searched[name].search.record
    assert record["kl"] <= record["start_kl"]
    assert searched[name].provenance["search"] == record


def test_search_is_deterministic_for_a_seed(dense, searched):
    again = prune(dense, config(**ALIGNMENTS["mlp multiple 8"]))
    first = searched["mlp multiple 8"]
    assert [e.picks for e in again.search.evaluated] == [e.picks for e in first.search.evaluated]
    assert again.provenance["search"] == first.provenance["search"]
    for a, b in zip(again.masks, first.masks):
        assert torch.equal(a.heads, b.heads) and torch.equal(a.mlp, b.mlp)


def test_start_fitness_is_the_kl_of_the_checkpoint_prune_writes_for_the_same_widths(dense, searched):
    result = searched["mlp multiple 8"]
    record = result.provenance["search"]
    windows = result.statistics.windows[:record["windows"][1]]
    flap = prune(dense, replace(config(**ALIGNMENTS["mlp multiple 8"]), search="none"))
    assert record["improvements"] > 0  # else the two checks below would be one
    for path, kl in ((flap.path, record["start_kl"]), (result.path, record["kl"])):
        measured = evaluate_windows(str(path), windows, reference=dense, batch_size=4, progress=False).kl
        assert measured == pytest.approx(kl, rel=1e-5, abs=1e-9)


def test_ls_search_needs_the_covariances_held(dense):
    stats = collect_statistics(dense, config(), covariance=False)
    with pytest.raises(ParameterError, match="covariances"):
        prune(dense, config(), statistics=stats)


@pytest.mark.parametrize("kw, param", [
    (dict(method="wanda-sp"), "search"),
    (dict(search_budget="ten"), "search_budget"),
    (dict(search_budget="-5"), "search_budget"),
    (dict(search_windows=17), "search_windows"),
    (dict(search="annealing"), "search"),
])
def test_bad_search_settings_are_refused_before_any_work(kw, param):
    with pytest.raises(ParameterError) as e:
        config(**kw).validate()
    assert e.value.param == param


def test_budget_is_evaluations_or_a_time():
    assert parse_budget("200") == (200, None)
    assert parse_budget("90s") == (None, 90.0)
    assert parse_budget("1.5m") == (None, 90.0)
    assert parse_budget("1h") == (None, 3600.0)
