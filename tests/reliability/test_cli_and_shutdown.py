"""Issue 13's probes of the command line (inputs checked before work, stdout purity) and of SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving_util import free_port

pytestmark = pytest.mark.reliability

REPO = Path(__file__).resolve().parents[2]


def _cli(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "flap_deploy_cli", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr


def test_item10_serve_flags_are_checked_before_the_model_loads(tmp_path):
    missing = str(tmp_path / "no-such-model")  # were it loaded, the error would name the model
    _one_line_error(_cli("serve", missing, "--backend", "onnx", "--port", "99999"), "--port")
    _one_line_error(_cli("serve", missing, "--backend", "onnx", "--max-model-len", "1"), "--max-model-len")
    _one_line_error(_cli("serve", missing, "--backend", "onnx", "--max-queue", "-1"), "--max-queue")
    _one_line_error(_cli("serve", missing, "--backend", "onnx", "--max-request-bytes", "lots"), "--max-request-bytes")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        r = _cli("serve", missing, "--backend", "onnx", "--port", str(held.getsockname()[1]))
    assert r.returncode != 0 and "not available" in r.stderr and "no-such-model" not in r.stderr, r.stderr


@pytest.mark.slow
def test_item10_json_stdout_is_only_json_when_the_bundled_model_is_converted(tmp_path):
    # a fresh cache: the bundled model is converted on first use, with a notice that is not JSON
    cache = tmp_path / "cache"
    r = _cli("info", "smollm2-135m", "--json", env={"FLAP_DEPLOY_CACHE": str(cache)}, timeout=600)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)  # nothing but the JSON
    assert "converting bundled" in r.stderr


def test_item9_unwritable_output_fails_before_work(tmp_path):
    r = _cli("prune", "smollm2-135m", "/proc/x/out", "--json")
    _one_line_error(r, "/proc/x/out")


def test_item9_truncated_weights_of_a_dense_source_fail_in_one_line(tmp_path):
    from factories import tiny_dense

    src = tmp_path / "dense"
    tiny_dense().save_pretrained(src)
    weights = next(src.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    _one_line_error(_cli("prune", str(src), str(tmp_path / "out")), "truncated safetensors")
    (src / "config.json").write_text("{not json")
    _one_line_error(_cli("prune", str(src), str(tmp_path / "out")), "invalid JSON")
    assert not (tmp_path / "out").exists()


def test_item10_sigterm_ends_running_streams_with_a_final_event(tmp_path):
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
