"""The ONNX Runtime server survives bad requests, slow clients and abandoned requests (the probes of
issue 13), on the numpy contract model (fast), 127.0.0.1 only."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest
from serving_fakes import TinyNumpyLM
from serving_util import free_port, running, tiny_tokenizer

from serving.onnx.app import create_app, run_server
from serving.onnx.server import OnnxServer
from serving.onnx.settings import OnnxServerSettings

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


class Slow(TinyNumpyLM):
    """A decode step of 50 ms, so that requests are surely still running when a probe acts."""

    def forward(self, *args):
        time.sleep(0.05)
        return super().forward(*args)


class PoisonPill(TinyNumpyLM):
    """Runs normally, except that a prompt containing token 7 makes its graph call fail."""

    def forward(self, input_ids, *args):
        if (np.asarray(input_ids) == 7).any():
            raise RuntimeError("this request's graph call failed")
        return super().forward(input_ids, *args)


def _server(tokenizer, model=None, **kw) -> OnnxServer:
    opts = dict(model="tiny", max_model_len=256, max_num_seqs=4, max_queue=8, log_level="warning")
    opts.update(kw)
    return OnnxServer(model or TinyNumpyLM(vocab=len(tokenizer), seed=3), tokenizer, OnnxServerSettings(**opts))


def _wait_listening(port: int) -> None:
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_poison_temperature_does_not_kill_the_engine(tokenizer):
    server = _server(tokenizer, model=Slow(vocab=len(tokenizer)))
    with running(create_app(server)) as url:
        stream_body = {"prompt": "w1 w2", "max_tokens": 40, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", url + "/completions", json=stream_body, timeout=30) as concurrent:
            lines = concurrent.iter_lines()
            next(lines)
            poison = httpx.post(url + "/completions", json={"prompt": "Hi", "max_tokens": 4, "temperature": 1e-320},
                                timeout=20)
            assert poison.status_code == 200, poison.text  # a tiny temperature is greedy, as in vLLM
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
        assert httpx.get(url[:-3] + "/health").status_code == 200
        assert httpx.post(url + "/completions", json={"prompt": "w3", "max_tokens": 2}, timeout=20).status_code == 200


def test_a_failing_request_ends_alone(tokenizer):
    server = _server(tokenizer, model=PoisonPill(vocab=len(tokenizer)))
    with running(create_app(server)) as url:
        bad = httpx.post(url + "/completions", json={"prompt": [7, 8], "max_tokens": 3}, timeout=20)
        assert "graph call failed" in _openai_error(bad, 500)["message"]
        bad_stream = httpx.post(url + "/completions", json={"prompt": [7], "max_tokens": 3, "stream": True},
                                timeout=20)
        events = [line for line in bad_stream.text.splitlines() if line.startswith("data: ")]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
        assert server.engine.alive and httpx.get(url[:-3] + "/health").status_code == 200
        ok = httpx.post(url + "/completions", json={"prompt": [1, 2], "max_tokens": 3}, timeout=20)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_engine_death_exits_non_zero(tokenizer):
    class Fatal(TinyNumpyLM):
        def empty_past(self, batch):
            raise SystemExit("the runtime is gone")  # escapes the per-request isolation

    port = free_port()
    server = _server(tokenizer, model=Fatal(vocab=len(tokenizer)), port=port)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_server(server)), daemon=True)
    thread.start()
    _wait_listening(port)
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "w1", "max_tokens": 2}, timeout=20)
    _openai_error(r, 500)
    thread.join(20)
    assert result == [1]  # the process would exit 1, so a supervisor restarts it


def test_oversized_body_is_refused_before_it_is_read(tokenizer):
    server = _server(tokenizer, max_request_bytes=1 << 20)
    with running(create_app(server)) as url:
        prompt = "w1 " * 1_000_000  # 3 MB
        t0 = time.perf_counter()
        r = httpx.post(url + "/completions", json={"prompt": prompt, "max_tokens": 1}, timeout=60)
        assert _openai_error(r, 413)["code"] == "request_too_large"
        assert time.perf_counter() - t0 < 5
        health = httpx.get(url[:-3] + "/health", timeout=2)
        assert health.status_code == 200


def test_slow_headers_are_timed_out(tokenizer):
    server = _server(tokenizer)
    port = free_port()
    server = _server(tokenizer, port=port, header_timeout_s=1.0)
    thread = threading.Thread(target=run_server, args=(server,), daemon=True)
    thread.start()
    _wait_listening(port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        t0 = time.perf_counter()
        assert s.recv(1024) == b""  # the server closed the connection
        assert time.perf_counter() - t0 < 5
    server.engine.shutdown()


def test_abandoned_non_streaming_request_frees_its_slot(tokenizer):
    server = _server(tokenizer, model=Slow(vocab=len(tokenizer)), max_num_seqs=1)
    with running(create_app(server)) as url:
        body = {"prompt": "w1", "max_tokens": 200, "ignore_eos": True}  # 10 s of decoding
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
        gave_up = time.perf_counter()
        while server.engine.stats()["running"] and time.perf_counter() - gave_up < 5:
            time.sleep(0.01)
        assert server.engine.stats() == {"running": 0, "waiting": 0}
        assert time.perf_counter() - gave_up < 1.0  # a step or two, not the 200 tokens


def test_negative_seed_and_deep_json_get_openai_errors(tokenizer):
    server = _server(tokenizer)
    with running(create_app(server)) as url:
        r = httpx.post(url + "/completions", json={"prompt": "w1", "max_tokens": 2, "seed": -1}, timeout=20)
        assert r.status_code == 200, r.text  # a valid seed for vLLM, so for us
        _openai_error(httpx.post(url + "/completions", json={"prompt": "w1", "seed": 2**70}, timeout=20), 400)
        deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = httpx.post(url + "/completions", content=deep, headers={"content-type": "application/json"}, timeout=20)
        _openai_error(r, 400)


def test_more_sequences_than_the_queue_is_400_not_503(tokenizer):
    server = _server(tokenizer, max_queue=4)
    with running(create_app(server)) as url:
        r = httpx.post(url + "/completions", json={"prompt": ["w1"] * 3, "n": 2, "max_tokens": 1}, timeout=20)
        err = _openai_error(r, 400)
        assert "Retry-After" not in r.headers and "--max-queue" in err["message"]


def test_docs_and_openapi_need_the_key(tokenizer):
    server = _server(tokenizer, api_key="sk-key")
    with running(create_app(server)) as url:
        base = url[:-3]
        assert httpx.get(base + "/docs").status_code == 404
        _openai_error(httpx.get(base + "/openapi.json"), 401)
        assert httpx.get(base + "/openapi.json", headers={"Authorization": "Bearer sk-key"}).status_code == 200
