"""The command line checks its inputs before work and keeps --json stdout pure; SIGTERM ends running
streams with a final event (the probes of issue 13)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cli_util import one_line_error, run_cli
from serving_util import free_port

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]


def test_serve_flags_are_checked_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no-such-model")  # were it loaded, the error would name the model
    one_line_error(run_cli("serve", missing, "--backend", "onnx", "--port", "99999"), "--port")
    one_line_error(run_cli("serve", missing, "--backend", "onnx", "--max-model-len", "1"), "--max-model-len")
    one_line_error(run_cli("serve", missing, "--backend", "onnx", "--max-queue", "-1"), "--max-queue")
    one_line_error(run_cli("serve", missing, "--backend", "onnx", "--max-request-bytes", "lots"), "--max-request-bytes")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        r = run_cli("serve", missing, "--backend", "onnx", "--port", str(held.getsockname()[1]))
    assert "no-such-model" not in one_line_error(r, "not available")


@pytest.mark.slow
def test_json_stdout_is_only_json_when_the_bundled_model_is_converted(tmp_path):
    # a fresh cache: the bundled model is converted on first use, with a notice that is not JSON
    cache = tmp_path / "cache"
    r = run_cli("info", "smollm2-135m", "--json", env={"FLAP_DEPLOY_CACHE": str(cache)}, timeout=600)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)  # nothing but the JSON
    assert "converting bundled" in r.stderr


def test_unwritable_prune_output_fails_before_work(tmp_path):
    one_line_error(run_cli("prune", "smollm2-135m", "/proc/x/out", "--json"), "/proc/x/out")


def test_truncated_weights_or_bad_config_of_a_dense_source_fail_in_one_line(tmp_path):
    from factories import tiny_dense

    src = tmp_path / "dense"
    tiny_dense().save_pretrained(src)
    weights = next(src.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    one_line_error(run_cli("prune", str(src), str(tmp_path / "out")), "truncated safetensors")
    (src / "config.json").write_text("{not json")
    one_line_error(run_cli("prune", str(src), str(tmp_path / "out")), "invalid JSON")
    assert not (tmp_path / "out").exists()


def test_sigterm_ends_running_streams_with_a_final_event(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("serve_tiny.py")), str(port), "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120  # the tokenizer's import alone takes half a minute on a loaded machine
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"prompt": "w1", "max_tokens": 200, "stream": True, "ignore_eos": True}  # 10 s of tokens
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            t0 = time.perf_counter()
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert "shutting_down" in events[-2]
        proc.wait(timeout=10)
        assert time.perf_counter() - t0 < 2 + 3  # --shutdown-timeout 2, plus the exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
