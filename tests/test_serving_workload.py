"""The workload vocabulary: length distributions, dataset files, arrivals (vLLM's), SLOs and goodput."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cli_util import one_line_error
from click.testing import CliRunner
from serving_util import tiny_tokenizer

from flap_deploy.errors import ParameterError
from flap_deploy_cli import main
from serving.measure.bench import RequestResult, calculate_metrics
from serving.measure.workload import arrival_offsets, parse_slo, parse_workload


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_length_distributions_are_seeded_and_as_requested(tok):
    lognormal = parse_workload("lognormal:20,0.5,10,0.3")
    a = lognormal.requests(tok, 400, seed=5)
    assert [r.prompt for r in a] == [r.prompt for r in lognormal.requests(tok, 400, seed=5)]
    assert [r.prompt for r in a] != [r.prompt for r in lognormal.requests(tok, 400, seed=6)]
    ins, outs = np.array([r.prompt_len for r in a]), np.array([r.output_len for r in a])
    assert all(r.prompt_len == len(r.prompt) for r in a)
    # the medians and the spread of log lengths as asked (400 draws: a few per cent)
    assert np.median(ins) == pytest.approx(20, rel=0.1) and np.median(outs) == pytest.approx(10, rel=0.1)
    assert np.log(ins).std() == pytest.approx(0.5, rel=0.15) and np.log(outs).std() == pytest.approx(0.3, rel=0.2)
    uniform = parse_workload("uniform:3,9,2,4").requests(tok, 300, seed=0)
    assert {r.prompt_len for r in uniform} == set(range(3, 10)) and {r.output_len for r in uniform} == {2, 3, 4}


def test_chat_prompts_are_counted_by_the_tokenizer(tok, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 50}" for i in range(500)))
    reqs = parse_workload("uniform:5,15,1,1").requests(tok, 20, prompts=str(text), seed=1, chat=True)
    assert all(isinstance(r.prompt, str) and r.prompt_len == len(tok.encode(r.prompt, add_special_tokens=False))
               for r in reqs)
    assert {r.prompt_len for r in reqs} <= set(range(5, 16))


def test_sharegpt_and_custom_files_load(tok, tmp_path):
    share = tmp_path / "share.json"
    share.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "w1 w2 w3"}, {"from": "gpt", "value": "w4 w5"}]},
        {"conversations": [{"from": "human", "value": "w6"}]},  # no reply: skipped
        {"conversations": [{"from": "human", "value": "w7 w8"}, {"from": "gpt", "value": "w9 w10 w11 w12"}]}]))
    reqs = parse_workload(f"sharegpt:{share}").requests(tok, 4, seed=0)
    assert sorted({(r.prompt_len, r.output_len) for r in reqs}) == [(2, 4), (3, 2)] and len(reqs) == 4
    assert all(r.prompt == tok.encode(t, add_special_tokens=False) for r in reqs
               for t in ["w1 w2 w3" if r.prompt_len == 3 else "w7 w8"])
    custom = tmp_path / "c.jsonl"
    custom.write_text('{"prompt": "w1 w2 w3 w4", "output_tokens": 7}\n\n{"prompt": "w5"}\n')
    reqs = parse_workload(f"custom:{custom}").requests(tok, 2, seed=0, chat=True)
    assert sorted((r.prompt, r.prompt_len, r.output_len) for r in reqs) == [("w1 w2 w3 w4", 4, 7), ("w5", 1, 256)]


@pytest.mark.parametrize("spec, message", [
    ("poisson:1,2", "expected one of fixed:IN,OUT"),
    ("fixed:8", "expected fixed:IN,OUT"),
    ("fixed:8,0", "whole numbers"),
    ("lognormal:0,0.5,10,0.3", "medians"),
    ("lognormal:10,-1,10,0.3", "sigmas"),
    ("uniform:9,3,1,2", "minimum must not exceed"),
])
def test_impossible_workloads_are_refused(spec, message):
    with pytest.raises(ParameterError, match=message) as e:
        parse_workload(spec)
    assert e.value.param == "workload"


def test_gamma_arrivals_follow_vllm_burstiness():
    """Gaps of shape k have a coefficient of variation 1 / sqrt(k) (vLLM's burstiness); n arrivals end at n / rate."""
    for burstiness in (0.25, 1.0, 4.0):
        t = arrival_offsets(20000, 50.0, burstiness, seed=0)
        gaps = np.diff(np.concatenate([[0.0], t]))
        assert t[-1] == pytest.approx(20000 / 50.0) and gaps.mean() == pytest.approx(1 / 50, rel=0.01)
        assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert np.allclose(np.diff(arrival_offsets(10, 4.0, math.inf)), 0.25)
    assert not arrival_offsets(5, math.inf).any()
    assert (arrival_offsets(50, 3.0, 0.5, seed=7) == arrival_offsets(50, 3.0, 0.5, seed=7)).all()


def test_slo_syntax():
    slo = parse_slo("ttft_p99=500ms, tpot_p90=0.05s,e2e_p50=2s,itl_p99=40ms")
    assert str(slo) == "ttft_p99=500ms,tpot_p90=50ms,e2el_p50=2s,itl_p99=40ms"
    assert parse_slo(str(slo)) == slo
    assert slo.percentiles == {50.0, 90.0, 99.0}
    for bad, message in (("ttfb_p99=5ms", "METRIC one of"), ("ttft_p95=5ms", "percentile must be"),
                         ("ttft_p99=5", "positive number with a unit"), ("ttft_p99=5min", "unit"),
                         ("ttft_p99=-5ms", "positive"), ("ttft_p99", "METRIC_pP=VALUE")):
        with pytest.raises(ParameterError, match=message):
            parse_slo(bad)


def test_goodput_follows_vllm_per_request_rule():
    """Each request by its own TTFT / TPOT (0 for one token) / E2E; the run's percentiles for slo_met."""
    rs = [RequestResult(success=True, latency=1.0, ttft=0.1, itl=[0.3] * 3, output_tokens=4),   # tpot 300 ms
          RequestResult(success=True, latency=0.4, ttft=0.4, itl=[], output_tokens=1),          # tpot 0
          RequestResult(success=True, latency=0.5, ttft=0.2, itl=[0.1] * 3, output_tokens=4),   # tpot 100 ms
          RequestResult(success=False, error="HTTP 500")]
    m = calculate_metrics(rs, 2.0, slo=parse_slo("ttft_p50=300ms,tpot_p99=200ms"))
    assert m["good"] == 1 and m["request_goodput"] == pytest.approx(0.5)
    assert not m["slo_met"]  # a failed request
    m = calculate_metrics(rs[:3], 2.0, slo=parse_slo("ttft_p50=300ms"))
    assert m["good"] == 2 and m["slo_met"]  # the median TTFT is 200 ms
    m = calculate_metrics(rs[:3], 2.0, slo=parse_slo("itl_p90=150ms"))
    assert m["good"] == 2 and "p90" in m["itl_ms"]


@pytest.mark.parametrize("args, flag", [
    (["--slo", "ttfb_p99=1s"], "--slo"),
    (["--slo", "ttft_p99=1min"], "--slo"),
    (["--request-rate", "-2"], "--request-rate"),
    (["--burstiness", "0"], "--burstiness"),
    (["--workload", "sharegpt:/nonexistent/x.json"], "--workload"),
    (["--workload", "lognormal:10,9,10,0.1"], "--workload"),
])
def test_bench_refuses_bad_input_before_any_request(args, flag):
    # an unreachable server: a check that came after contacting it would say "cannot reach" instead
    res = CliRunner().invoke(main, ["bench", "--base-url", "http://127.0.0.1:9/v1", *args])
    assert one_line_error(res, flag).startswith(f"error: {flag}")


@pytest.mark.parametrize("content, message", [("{not json", "not JSON"), ('[{"conversations": []}]', "no usable prompt")])
def test_bench_refuses_a_bad_sharegpt_file(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_text(content)
    one_line_error(CliRunner().invoke(main, ["bench", "--base-url", "http://127.0.0.1:9/v1",
                                             "--workload", f"sharegpt:{path}"]), message)
