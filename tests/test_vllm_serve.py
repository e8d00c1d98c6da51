"""`flap-deploy serve --backend vllm`: bad inputs fail before any engine; a real server on the pruned bundled model.

The one engine on the real pruned model in this suite: beside the API checks, it answers with PyTorch's
greedy tokens and teacher-forced top-1 (the vLLM model file on per-layer widths; tests/test_vllm_model.py
checks the same on a tiny checkpoint under TP and PP).

The engine test is the vLLM path of `make demo` (whose test runs the ONNX path): `export vllm` of the
pruned model, `serve` as `compare` starts it, and `compare`'s load generator (`flap-deploy bench`).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli_util import one_line_error, run_cli
from exporters.vllm.export import export_vllm
from factories import tiny_heterogeneous
from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy_cli import main
from vllm_helpers import REPO, free_port, needs_vllm, vllm_env


def _serve(*args):
    return CliRunner().invoke(main, ["serve", *args, "--backend", "vllm"])


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(_serve(str(tmp_path)), "not a model checkpoint (no config.json)")
    one_line_error(_serve(str(tmp_path / "missing")), "not found")


def test_tp_violation_is_refused_before_the_engine(tmp_path):
    ckpt = save_checkpoint(tiny_heterogeneous(head_dim=32), tmp_path / "tiny")
    one_line_error(_serve(str(ckpt), "--tp-size", "4"),
                    "layer 2: 2 query heads are not divisible by tensor-parallel size 4")


def test_a_port_in_use_is_refused_before_the_engine(tmp_path):
    ckpt = save_checkpoint(tiny_heterogeneous(head_dim=32), tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        one_line_error(_serve(str(ckpt), "--port", str(port)), f"port {port} on 127.0.0.1 is not available")


@needs_vllm
@pytest.mark.slow
@pytest.mark.vllm
def test_serve_pruned_bundled_with_openai_client(flap20_dir, tmp_path):
    import psutil
    from openai import OpenAI

    # the demo's directory: the pruned model exported for vLLM in float32
    model = Path(export_vllm(flap20_dir, tmp_path / "vllm-pruned", dtype="float32")["output"])
    port = free_port()
    # the flags compare passes to each of its servers, and float32 (vLLM's CPU default for a float32
    # checkpoint is bfloat16) so that its tokens can be held to PyTorch's
    cmd = [sys.executable, "-m", "flap_deploy_cli", "serve", str(model), "--backend", "vllm", "--port", str(port),
           "--api-key", "secret", "--max-num-seqs", "4", "--max-model-len", "512", "--served-model-name", "pruned",
           "--", "--enforce-eager", "--dtype", "float32"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=vllm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    ready = threading.Event()

    def pump():
        for line in proc.stdout:
            log.append(line)
            if "ready at http://127.0.0.1" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    tree: set[int] = set()
    try:
        deadline = time.time() + 900
        while not ready.is_set() and proc.poll() is None and time.time() < deadline:
            ready.wait(1)
        assert ready.is_set(), "".join(log[-60:])
        tree = {proc.pid} | {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
        assert len(tree) >= 3  # CLI, API server, engine core (+ worker)

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="secret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["pruned"]
        done = client.completions.create(model="pruned", prompt="The capital of France is", max_tokens=8,
                                         temperature=0)
        assert done.choices[0].text and done.usage.completion_tokens == 8
        stream = client.chat.completions.create(model="pruned", messages=[{"role": "user", "content": "Hi!"}],
                                                max_tokens=8, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        assert "".join(pieces) and usage.completion_tokens == 8
        _matches_pytorch(flap20_dir, f"http://127.0.0.1:{port}/v1")
        wrong_key = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0)
        with pytest.raises(Exception, match="401|Unauthorized"):
            wrong_key.models.list()

        # vLLM's own load generator against the launcher's server (the key from OPENAI_API_KEY)
        bench = subprocess.run([sys.executable, "-m", "serving.vllm.bench", "--backend", "openai",
                                "--base-url", f"http://127.0.0.1:{port}", "--model", "pruned",
                                "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", "12",
                                "--random-output-len", "6", "--num-prompts", "8", "--ignore-eos",
                                "--max-concurrency", "4", "--seed", "0", "--save-result",
                                "--result-dir", str(tmp_path)],
                               cwd=tmp_path, env=dict(vllm_env(), OPENAI_API_KEY="secret"), capture_output=True,
                               text=True, timeout=600)
        assert bench.returncode == 0, bench.stdout[-2000:] + bench.stderr[-3000:]
        (result_file,) = tmp_path.glob("*.json")
        result = json.loads(result_file.read_text())
        assert result["completed"] == 8 and result["failed"] == 0 and result["total_output_tokens"] == 8 * 6

        # compare's load generator, as compare runs it on each of its servers
        ours = run_cli("bench", "--base-url", f"http://127.0.0.1:{port}/v1", "--api-key", "secret", "--tokenizer", model,
                       "--num-prompts", "8", "--workload", "fixed:12,6", "--concurrency", "1,4", "--json",
                       timeout=600)
        assert ours.returncode == 0, ours.stderr[-3000:]
        rows = json.loads(ours.stdout)
        assert [row["max_concurrency"] for row in rows] == [1, 4], rows
        assert all(row["completed"] == 8 and row["failed"] == 0 and row["total_output_tokens"] == 8 * 6 for row in rows)

        # the KV budget compare --capacity reports: vLLM's own planning, from its metrics
        from serving.backends import get_backend
        from serving.vllm.settings import VllmServerSettings

        tokens = get_backend("vllm").kv_cache_tokens(f"http://127.0.0.1:{port}/v1",
                                                     VllmServerSettings(model=str(model), api_key="secret"))
        assert tokens is not None and tokens >= 512, tokens  # at least one sequence of max_model_len
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        rc = proc.wait(timeout=120)
    assert rc == 0, "".join(log[-40:])
    time.sleep(0.5)
    left = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left: {left}"


def _matches_pytorch(flap20_dir: Path, url: str, max_tokens: int = 12) -> None:
    """The served pruned model (per-layer widths, fused add + RMSNorm wherever a layer keeps both modules) in
    float32: the same greedy tokens as PyTorch, >= 99 % teacher-forced top-1 (vLLM's prompt log-probabilities)."""
    import httpx
    import torch

    from flap_deploy.evaluation.perplexity import teacher_forced_top1
    from flap_deploy.io.model_ref import resolve_model
    from vllm_helpers import torch_greedy

    ref = resolve_model(flap20_dir)
    tok, model = ref.tokenizer(), ref.load(torch.float32)
    texts = ["The capital of France is", "In 1905, Albert Einstein published",
             "def fibonacci(n):\n    ", "The river flows through the valley and",
             "Pruning removes whole attention heads and MLP channels from a trained model, so the model that "
             "is left is smaller and faster. The removed units are chosen by how much their outputs vary over "
             "a calibration set: a unit whose output hardly changes can be replaced by its mean, which is "
             "added back as a bias. The result needs no retraining and runs on the usual kernels."]
    agree = total = 0
    for text in texts:
        prompt = tok(text)["input_ids"]
        r = httpx.post(url + "/completions", headers={"Authorization": "Bearer secret"}, timeout=120, json={
            "model": "pruned", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "prompt_logprobs": 1})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == torch_greedy(model, prompt, max_tokens), text
        # position 0 has no prediction; each later one holds the prompt's token and vLLM's rank-1 token
        served = [next(int(t) for t, lp in pos.items() if lp["rank"] == 1) for pos in choice["prompt_logprobs"][1:]]
        ref_top1, _ = teacher_forced_top1(model, prompt)
        agree += sum(a == b for a, b in zip(served, ref_top1))
        total += len(ref_top1)
    assert total and agree / total >= 0.99, (agree, total)


def test_foreign_per_layer_checkpoint_needs_export(tmp_path):
    import json

    from safetensors.torch import save_file

    model = tiny_heterogeneous(head_dim=32)
    out = tmp_path / "other"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96,
           "vocab_size": 128, "layer_inter_size": model.config.intermediate_size_per_layer}
    (out / "config.json").write_text(json.dumps(cfg))
    one_line_error(_serve(str(out)), "convert it first: flap-deploy export vllm")
