"""The load generator: metric definitions (as `vllm bench serve`), prompts, a run against our server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_util import one_line_error
from click.testing import CliRunner
from serving_fakes import TinyNumpyLM
from serving_util import running, tiny_tokenizer

from flap_deploy.errors import FlapDeployError
from flap_deploy_cli import main
from serving.measure.bench import RequestResult, calculate_metrics, run_bench
from serving.measure.workload import parse_workload
from serving.onnx.app import create_app
from serving.onnx.server import OnnxServer
from serving.onnx.settings import OnnxServerSettings


def test_metric_definitions_follow_vllm():
    rs = [RequestResult(success=True, latency=1.0, ttft=0.2, itl=[0.2, 0.3, 0.3], prompt_len=10, output_tokens=4),
          RequestResult(success=True, latency=0.5, ttft=0.5, itl=[], prompt_len=7, output_tokens=1),
          RequestResult(success=False, error="HTTP 503: full", prompt_len=9)]
    m = calculate_metrics(rs, duration=2.0)
    assert m["completed"] == 2 and m["failed"] == 1 and m["errors"] == {"HTTP 503: full": 1}
    assert m["total_input_tokens"] == 17 and m["total_output_tokens"] == 5
    assert m["request_throughput"] == pytest.approx(1.0)
    assert m["output_throughput"] == pytest.approx(2.5) and m["total_token_throughput"] == pytest.approx(11.0)
    # TPOT only for requests with more than one token: (1.0 - 0.2) / 3
    assert m["tpot_ms"]["mean"] == pytest.approx(800 / 3)
    assert m["ttft_ms"]["mean"] == pytest.approx(350) and m["ttft_ms"]["median"] == pytest.approx(350)
    assert m["itl_ms"]["p50"] == pytest.approx(300) and m["itl_ms"]["p99"] == pytest.approx(np.percentile([200, 300, 300], 99))
    assert m["e2el_ms"]["p90"] == pytest.approx(np.percentile([1000, 500], 90))


def test_the_warm_up_repeats_the_first_request_only(monkeypatch):
    """As `vllm bench serve`: a prefix-caching server must not see the measured prompts before the run."""
    import serving.measure.bench as bench

    sent = []

    async def fake_send(session, url, model, req, **kw):
        sent.append(req.prompt)
        return RequestResult(success=True, latency=0.1, ttft=0.05, itl=[0.05], prompt_len=req.prompt_len,
                             output_tokens=2)

    monkeypatch.setattr(bench, "send_request", fake_send)
    reqs = build_requests(tiny_tokenizer(), "self", 6, 8, 2, seed=0)
    run_bench("http://127.0.0.1:9/v1", reqs, model="m", concurrency=[4], warmup=4, progress=False)
    assert sent[:4] == [reqs[0].prompt] * 4  # the warm-up
    assert sent[4:] == [r.prompt for r in reqs]  # then every measured request once


def build_requests(tok, source, n, input_len, output_len, seed=0, chat=False):
    return parse_workload(f"fixed:{input_len},{output_len}").requests(tok, n, prompts=source, seed=seed, chat=chat)


def test_fixed_requests_from_self_and_file(tmp_path):
    tok = tiny_tokenizer()
    a = build_requests(tok, "self", 5, 12, 3, seed=1)
    b = build_requests(tok, "self", 5, 12, 3, seed=1)
    assert [r.prompt for r in a] == [r.prompt for r in b] and all(len(r.prompt) == 12 for r in a)
    assert not set(t for r in a for t in r.prompt) & set(tok.all_special_ids)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(300)))
    f = build_requests(tok, str(text), 4, 6, 2, seed=0)
    stream = tok.encode(text.read_text(), add_special_tokens=False)
    for r in f:
        assert any(stream[i:i + 6] == r.prompt for i in range(len(stream) - 5))
    with pytest.raises(FlapDeployError, match="no such file"):
        build_requests(tok, str(tmp_path / "missing.txt"), 1, 2, 2)
    with pytest.raises(FlapDeployError, match="fewer than a prompt's 10000"):
        build_requests(tok, str(text), 1, 10_000, 2)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok_dir = tmp_path_factory.mktemp("tok")
    tok = tiny_tokenizer(save_to=tok_dir)
    server = OnnxServer(TinyNumpyLM(vocab=len(tok)), tok, OnnxServerSettings(model="tiny", max_model_len=128,
                                                                             max_num_seqs=4), model_root=str(tok_dir))
    with running(create_app(server)) as url:
        yield url, tok


@pytest.mark.parametrize("chat", [False, True])
def test_run_bench_against_our_server(served, chat):
    url, tok = served
    reqs = build_requests(tok, "self", 10, 8, 5, seed=0, chat=chat)
    result = run_bench(url, reqs, concurrency=[1, 4], chat=chat, tokenizer=tok, progress=False)
    assert result["model"] == "tiny" and len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["completed"] == 10 and run["failed"] == 0
        assert run["total_output_tokens"] == 50  # ignore_eos: exactly output_len each
        if not chat:
            assert run["total_input_tokens"] == 80
        assert run["request_throughput"] > 0 and run["output_throughput"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(run[key]) == {"mean", "median", "std", "p50", "p90", "p99"}
            assert run[key]["mean"] > 0
        for r in run["requests"]:
            assert len(r["itl"]) == 4 and r["output_tokens"] == 5


def test_poisson_rate_and_errors_are_counted(served):
    url, tok = served
    reqs = build_requests(tok, "self", 6, 8, 3, seed=0)
    reqs[2].output_len = 1000  # beyond the context: a 400 that the run must count, not crash on
    result = run_bench(url, reqs, request_rate=50.0, tokenizer=tok, progress=False, warmup=0)
    run = result["runs"][0]
    assert run["completed"] == 5 and run["failed"] == 1
    assert any("HTTP 400" in e for e in run["errors"])


def test_bench_cli_writes_report(served, tmp_path):
    url, _ = served
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["bench", "--base-url", url, "--num-prompts", "6", "--workload", "fixed:8,4",
                                  "--concurrency", "1,3", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [row["max_concurrency"] for row in rows] == [1, 3] and all(row["completed"] == 6 for row in rows)
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}
    assert "TTFT" in (out / "bench.md").read_text()
    one_line_error(CliRunner().invoke(main, ["bench", "--base-url", "http://127.0.0.1:9/v1", "--num-prompts", "1"]),
                   "cannot reach")


def test_open_loop_sends_at_the_requested_rate(served):
    """Measured send times of a seeded Poisson run: mean gap within 10 % of 1 / rate."""
    url, tok = served
    reqs = build_requests(tok, "self", 40, 4, 1, seed=0)
    run = run_bench(url, reqs, request_rate=40.0, seed=3, tokenizer=tok, progress=False, warmup=0)["runs"][0]
    sent = sorted(r["start_time"] for r in run["requests"])
    # 40 arrivals span 40 / rate = 1 s (vLLM's scaling): the first gap is from the clock's start, not a send
    gaps = np.diff(sent)
    assert run["completed"] == 40 and gaps.mean() == pytest.approx(1 / 40, rel=0.1)


def test_goodput_counts_the_requests_that_missed_the_slo(served):
    """A burst on a server of four slots: the requests queued behind the first four wait for a slot, so a TTFT
    bound at the fourth-fastest is missed by the rest, each judged by its own TTFT; a generous SLO makes
    goodput equal throughput."""
    from serving.measure.workload import parse_slo

    url, tok = served
    reqs = build_requests(tok, "self", 12, 8, 24, seed=0)
    loose = run_bench(url, reqs, tokenizer=tok, progress=False, warmup=0,
                      slo=parse_slo("ttft_p99=60s,tpot_p99=60s,itl_p90=60s,e2el_p50=60s"))["runs"][0]
    assert loose["good"] == 12 and loose["slo_met"]
    assert loose["request_goodput"] == pytest.approx(loose["request_throughput"])
    # the same requests judged by a tight bound (the run's own figures, so the verdicts are known)
    results = [RequestResult(**r) for r in loose["requests"]]
    bound_ms = 1000 * sorted(r.ttft for r in results)[3]
    tight = calculate_metrics(results, loose["duration_s"], tok, slo=parse_slo(f"ttft_p99={bound_ms}ms"))
    met = sum(1000 * r.ttft <= bound_ms for r in results)
    assert tight["good"] == met and 4 <= met < 12 and not tight["slo_met"]
    assert tight["request_goodput"] == pytest.approx(met / loose["duration_s"])
