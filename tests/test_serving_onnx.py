"""The server on a real ONNX Runtime model (tiny heterogeneous FlapLlama exported to ONNX)."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
from cli_util import one_line_error
from factories import tiny_heterogeneous
from serving_util import concurrent_streams, running, tiny_tokenizer

from serving.onnx.app import create_app
from serving.onnx.server import load_onnx_server
from serving.onnx.settings import OnnxServerSettings

pytestmark = pytest.mark.slow  # exports a model (~30 s) and runs ONNX Runtime
MAX_LENGTH = 128


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from flap_deploy.io.checkpoint import save_checkpoint

    return save_checkpoint(tiny_heterogeneous(), tmp_path_factory.mktemp("tiny-onnx") / "ckpt",
                           tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def onnx_dir(tiny_ckpt):
    """The default (gqa) export, its max_length below the model's 256 positions."""
    from exporters.onnx import export_onnx

    return export_onnx(tiny_ckpt, tiny_ckpt.parent / "onnx", progress=False, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def served(onnx_dir):
    server = load_onnx_server(OnnxServerSettings(model=onnx_dir, served_model_name="tiny-onnx", max_num_seqs=8,
                                                 max_model_len=128, threads=1))
    with running(create_app(server)) as url:
        yield server, url


def test_the_context_length_defaults_to_the_exports_max_length(onnx_dir):
    from flap_deploy.errors import ParameterError

    assert load_onnx_server(OnnxServerSettings(model=onnx_dir, threads=1)).max_model_len == MAX_LENGTH
    with pytest.raises(ParameterError, match="max_model_len"):
        load_onnx_server(OnnxServerSettings(model=onnx_dir, max_model_len=MAX_LENGTH + 1))


@pytest.mark.parametrize("form", ["gqa", "past-present"])
def test_engine_joins_and_leaves_equal_generate_alone_in_both_forms(tiny_ckpt, onnx_dir, form):
    """Ragged prompts and lengths through 3 slots: sequences join and leave mid-batch in either form."""
    import queue

    from exporters.onnx import OnnxCausalLM, export_onnx
    from flap_deploy.generation.sampling import SamplingParams
    from serving.onnx.engine import Engine

    path = onnx_dir if form == "gqa" else export_onnx(tiny_ckpt, tiny_ckpt.parent / form, progress=False,
                                                      attention=form, verify=False)
    lm = OnnxCausalLM.from_dir(path, threads=1)
    rng = np.random.default_rng(1)
    jobs = [([int(t) for t in rng.integers(6, 128, size=int(rng.integers(1, 20)))], int(rng.integers(1, 24)))
            for _ in range(8)]
    alone = [lm.generate([p], max_tokens=n, temperature=0.0, ignore_eos=True)[0].token_ids for p, n in jobs]
    engine = Engine(lm, max_model_len=64, max_num_seqs=3).start()
    try:
        sinks = [queue.Queue() for _ in jobs]
        for (p, n), q in zip(jobs, sinks):
            engine.submit(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), q.put)
        together = [[q.get(timeout=60).token_id for _ in range(n)] for (_, n), q in zip(jobs, sinks)]
    finally:
        engine.shutdown()
    assert together == alone


def test_greedy_matches_onnx_generate(served):
    """The engine's continuous batching gives what the exporter's own generate() gives."""
    server, url = served
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    model = server.engine.model
    prompts = [[5, 9, 17, 33], [7], [100, 3, 64, 2, 90, 11, 8]]
    ref = model.generate(prompts, max_tokens=10, temperature=0.0, ignore_eos=True)
    for p, g in zip(prompts, ref):
        r = client.completions.create(model="tiny-onnx", prompt=p, max_tokens=10, temperature=0,
                                      logprobs=0, extra_body={"ignore_eos": True})
        tokens = r.choices[0].logprobs.tokens
        assert r.usage.completion_tokens == 10 and len(tokens) == 10
        assert r.choices[0].text == server.tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_32_concurrent_streams_on_onnx(served):
    server, url = served
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(6, 128, size=int(rng.integers(1, 24)))] for _ in range(32)]
    lens = [int(n) for n in rng.integers(1, 20, size=32)]
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    alone = [client.completions.create(model="tiny-onnx", prompt=p, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p, n in zip(prompts, lens)]

    results = concurrent_streams(url, "tiny-onnx", prompts, lens, timeout=300)
    assert [r[0] for r in results] == alone
    assert [r[1] for r in results] == lens and [r[2] for r in results] == lens
    assert server.engine.stats() == {"running": 0, "waiting": 0}


def test_chat_on_onnx(served):
    server, url = served
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
    r = client.chat.completions.create(model="tiny-onnx", messages=[{"role": "user", "content": "w5 w6"}],
                                       max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].message.role == "assistant"


def test_bench_full_metric_set_on_onnx(served):
    from serving.measure.bench import run_bench
    from serving.measure.workload import parse_workload

    server, url = served
    reqs = parse_workload("fixed:10,6").requests(server.tokenizer, 12, seed=0)
    result = run_bench(url, reqs, concurrency=[2, 8], tokenizer=server.tokenizer, progress=False)
    for run in result["runs"]:
        assert run["completed"] == 12 and run["failed"] == 0
        assert run["total_input_tokens"] == 120 and run["total_output_tokens"] == 72
        for key in ("request_throughput", "output_throughput", "total_token_throughput"):
            assert run[key] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert {"mean", "median", "p90", "p99"} <= set(run[key]) and run[key]["p99"] >= run[key]["median"] > 0


@pytest.mark.slow
@pytest.mark.vllm
def test_bench_agrees_with_vllm_bench_serve(served, tmp_path):
    """`vllm bench serve` (from the vLLM install) and our bench, the same open-loop workload against the same
    server: same completed count, request throughput and goodput within 10 % of each other."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from click.testing import CliRunner

    from flap_deploy_cli import main

    pytest.importorskip("vllm")
    server, url = served
    n, rate = 32, 8.0
    repo = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "serving.vllm.bench", "--backend", "openai", "--base-url", url[:-3],
           "--model", "tiny-onnx", "--tokenizer", server.model_root, "--dataset-name", "random",
           "--random-input-len", "12", "--random-output-len", "6", "--num-prompts", str(n), "--ignore-eos",
           "--request-rate", str(rate), "--burstiness", "1.0", "--goodput", "ttft:2000", "tpot:500", "e2el:5000",
           "--seed", "0", "--save-result", "--result-dir", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (result_file,) = tmp_path.glob("*.json")
    theirs = json.loads(result_file.read_text())
    res = CliRunner().invoke(main, ["bench", "--base-url", url, "--model", "tiny-onnx", "--workload", "fixed:12,6",
                                    "--num-prompts", str(n), "--request-rate", str(rate), "--burstiness", "1",
                                    "--slo", "ttft_p99=2s,tpot_p99=500ms,e2el_p99=5s", "--seed", "0", "--json"])
    assert res.exit_code == 0, res.output
    (ours,) = json.loads(res.stdout)
    assert theirs["completed"] == ours["completed"] == n and theirs["failed"] == ours["failed"] == 0
    assert theirs["total_output_tokens"] == ours["total_output_tokens"] == n * 6
    assert ours["request_throughput"] == pytest.approx(theirs["request_throughput"], rel=0.1)
    assert ours["request_goodput"] == pytest.approx(theirs["request_goodput"], rel=0.1)


def test_serve_cli_subprocess(onnx_dir, tmp_path):
    """`flap-deploy serve DIR --backend onnx` binds 127.0.0.1, checks the key, serves, stops on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    from serving_util import free_port

    repo = Path(__file__).resolve().parent.parent
    port = free_port()
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, "-m", "flap_deploy_cli", "serve", str(onnx_dir), "--backend", "onnx",
                             "--port", str(port), "--api-key", "k1", "--max-num-seqs", "2", "--max-model-len", "64",
                             "--threads", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="k1", max_retries=0)
        card = client.models.list().data[0]
        assert card.id == Path(onnx_dir).name and card.max_model_len == 64
        r = client.completions.create(model=card.id, prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=card.id, prompt=[5] * 60, max_tokens=10)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="k2", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn re-raises SIGTERM after its graceful shutdown
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out[-2000:]


def test_serve_cli_user_errors(tmp_path):
    from click.testing import CliRunner

    from flap_deploy_cli import main

    one_line_error(CliRunner().invoke(main, ["serve", str(tmp_path / "nope"), "--backend", "onnx"]), "not found")
    one_line_error(CliRunner().invoke(main, ["serve", str(tmp_path), "--backend", "onnx", "--max-num-seqs", "0"]),
                   "--max-num-seqs")


def test_the_onnx_entry_point_started_through_the_backend_table(onnx_dir, tmp_path):
    """`python -m serving.onnx SETTINGS` as compare and soak start it: the key only in its environment,
    the settings as given, and no process left after the stop."""
    import httpx
    from serving_util import free_port

    from serving.backends import BACKENDS

    onnx = BACKENDS["onnx"]
    settings = onnx.settings_for(onnx_dir, port=free_port(), api_key="k1", served_model_name="tiny", max_num_seqs=2,
                                 max_model_len=64, threads=1)
    with open(tmp_path / "server.log", "w") as log, onnx.process(settings, log=log) as server:
        server.wait_ready(120)
        assert server.command[1:3] == ["-m", "serving.onnx"] and not any("k1" in a for a in server.command)
        client = openai.OpenAI(base_url=settings.base_url + "/v1", api_key="k1", max_retries=0)
        card = client.models.list().data[0]
        assert (card.id, card.max_model_len) == ("tiny", 64)
        r = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        assert httpx.get(settings.base_url + "/v1/models", timeout=5).status_code == 401
    assert server.proc.returncode in (0, -15) and not server.pids()
