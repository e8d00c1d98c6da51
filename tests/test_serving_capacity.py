"""The capacity search on a simulated server of known saturation, and the model of the gain (KV bytes, ideals)."""

from __future__ import annotations

import math

import pytest
from serving_fakes import SaturatingServer

from flap_deploy.errors import ParameterError
from serving.measure.bench import calculate_metrics
from serving.measure.capacity import CapacitySearch, find_capacity, full_ideal
from serving.measure.capacity_report import capacity_text
from serving.measure.workload import arrival_offsets, parse_slo

REQUESTS = 200


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def searcher(server: SaturatingServer, slo: str, clock: FakeClock | None = None, burstiness: float = math.inf):
    """measure(rate): REQUESTS arrivals at the rate (the workload module's), served by the simulated server."""
    slo = parse_slo(slo)

    def measure(rate: float) -> dict:
        results, duration = server.run(arrival_offsets(REQUESTS, rate, burstiness, seed=1))
        if clock is not None:
            clock.now += duration
        return calculate_metrics(results, duration, slo=slo)

    return measure


@pytest.mark.parametrize("start", [0.5, 3.0, 40.0])
def test_capacity_lies_within_the_resolution_of_the_saturation(start):
    """Evenly spaced arrivals: nothing waits below saturation, and a queue builds above it, so an SLO at the
    unloaded TTFT breaks at the saturation point, whichever side the search starts on."""
    server = SaturatingServer(slots=2, prefill_s=0.05, tpot_s=0.01, output_tokens=6)  # 20 req/s
    search = CapacitySearch(start=start, resolution=0.05, max_rate=1000)
    found = find_capacity(searcher(server, "ttft_p99=50.5ms"), search)
    assert found["complete"] and found["limit"] is None
    assert found["capacity"] <= server.saturation < found["failed_rate"]
    assert found["failed_rate"] == pytest.approx(found["capacity"] * 1.05)
    assert server.saturation / found["capacity"] <= 1.05
    # bracketing doubles, then bisection closes the bracket: a few points, not a sweep of the grid
    assert len(found["points"]) <= 12


def test_capacity_is_monotone_in_the_slo():
    """Poisson arrivals: queueing starts below saturation, so the capacity grows with the bound, never shrinks."""
    server = SaturatingServer(slots=4, prefill_s=0.02, tpot_s=0.005, output_tokens=9)
    search = CapacitySearch(start=10.0, resolution=0.1)
    found = [find_capacity(searcher(server, f"ttft_p99={ms}ms,tpot_p50=6ms", burstiness=1.0), search)["capacity"]
             for ms in (25, 40, 80, 200, 1000)]
    assert all(c is not None for c in found) and found == sorted(found) and found[0] < found[-1]


def test_capacity_search_reports_its_limits_and_budget():
    server = SaturatingServer(slots=1, prefill_s=0.1, tpot_s=0.02, output_tokens=6)  # 5 req/s
    slo = "e2el_p99=201ms"
    capped = find_capacity(searcher(server, slo), CapacitySearch(start=1.0, max_rate=3.0, resolution=0.1))
    assert capped["limit"] == "max_rate" and capped["capacity"] <= 3.0 and capped["failed_rate"] is None
    none = find_capacity(searcher(server, slo), CapacitySearch(start=20.0, min_rate=8.0, resolution=0.1))
    assert none["capacity"] is None and none["limit"] == "min_rate" and none["failed_rate"] >= 8.0
    assert capacity_text(capped) == f"at least {capped['capacity']:.3g}" and capacity_text(none) == "less than 8"
    # a budget of about two runs: the search stops with what it measured, marked incomplete
    clock = FakeClock()
    short = find_capacity(searcher(server, slo, clock), CapacitySearch(start=1.0, budget_s=250.0), clock=clock)
    assert not short["complete"] and len(short["points"]) == 2 and short["failed_rate"] is None
    assert capacity_text(short) == f"{short['capacity']:.3g} (unfinished)"


def test_capacity_search_refuses_impossible_settings():
    for kwargs, param in (({"start": 0.0}, "rate_start"), ({"start": 500.0}, "rate_start"),
                          ({"resolution": 0.0}, "resolution"), ({"budget_s": -1.0}, "budget")):
        with pytest.raises(ParameterError) as e:
            CapacitySearch(**kwargs)
        assert e.value.param == param


def test_full_ideal_counts_weights_and_kv_bytes():
    weights = {"dense_decode_bytes": 1000, "pruned_decode_bytes": 800, "ideal_ratio": 1.25}
    kv = {"dense": 10, "pruned": 5}
    assert full_ideal(weights, kv, batch=0, context=100) == pytest.approx(1.25)
    assert full_ideal(weights, kv, batch=4, context=50) == pytest.approx((1000 + 2000) / (800 + 1000))


def test_kv_bytes_and_full_ideal_of_the_bundled_pair_by_hand(bundled_dir, flap20_dir):
    """SmolLM2-135M: 30 layers of 3 KV heads of 64; the pruned one keeps fewer KV heads in some layers."""
    from flap_deploy.io.checkpoint import read_config
    from flap_deploy.io.model_ref import resolve_model
    from serving.backends import get_backend
    from serving.measure.capacity import kv_model
    from serving.measure.compare import ideal_ratio

    kept = read_config(flap20_dir)["num_key_value_heads_per_layer"]
    assert len(kept) == 30 and sum(kept) < 90
    refs = {"dense": resolve_model(bundled_dir), "pruned": resolve_model(flap20_dir)}
    weights = ideal_ratio(refs["dense"], refs["pruned"], "onnx")  # float32 exports: 4 bytes an element
    lengths = {"mean_input_len": 1500.0, "mean_output_len": 200.0}
    kv = kv_model(refs, get_backend("onnx"), (), {"dense": 8 * 2048, "pruned": 8 * 2048}, lengths, weights,
                  batch=6.0, batch_bound=8)
    dense_kv, pruned_kv = 30 * 2 * 3 * 64 * 4, sum(kept) * 2 * 64 * 4
    assert kv["kv_bytes_per_token"] == {"dense": dense_kv, "pruned": pruned_kv}
    assert kv["sequences_that_fit"] == {"dense": 8 * 2048 // 1700, "pruned": 8 * 2048 // 1700}
    context = 1500 + 200 / 2
    expected = ((weights["dense_decode_bytes"] + 6 * context * dense_kv)
                / (weights["pruned_decode_bytes"] + 6 * context * pruned_kv))
    assert kv["decode_context"] == context and kv["full_ideal"] == pytest.approx(expected)
    assert kv["weight_only_ideal"] == weights["ideal_ratio"]
