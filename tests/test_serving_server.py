"""The OpenAI-compatible server over the engine: the official `openai` client, errors, streaming.

The model is the numpy contract model (fast); tests/test_serving_onnx.py runs the same server
on a real ONNX Runtime model.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from serving_fakes import TinyNumpyLM
from serving_util import concurrent_streams, running, tiny_tokenizer

from serving.onnx.app import create_app
from serving.onnx.server import OnnxServer
from serving.onnx.settings import OnnxServerSettings

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _server(tokenizer, **kw) -> OnnxServer:
    model = TinyNumpyLM(vocab=len(tokenizer), seed=3)
    opts = dict(model="tiny", max_model_len=64, max_num_seqs=4, max_queue=64)
    opts.update(kw)
    return OnnxServer(model, tokenizer, OnnxServerSettings(**opts))


@pytest.fixture(scope="module")
def base_url(tokenizer):
    with running(create_app(_server(tokenizer))) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def _metric(base_url: str, name: str) -> float:
    text = httpx.get(base_url[:-3] + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_models_health_and_metrics_endpoints_answer(base_url, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(base_url[:-3] + "/health").json()["status"] == "ok"
    text = httpx.get(base_url[:-3] + "/metrics").text
    for name in ("flap:requests_total", "flap:num_requests_running", "flap:num_requests_waiting",
                 "flap:decode_batch_size_bucket", "flap:time_to_first_token_seconds_bucket",
                 "flap:e2e_request_latency_seconds_bucket", "flap:generation_tokens_total"):
        assert name in text


def test_completion_chat_and_usage(client, tokenizer):
    prompt = "w1 w2 w3 w4"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=7, temperature=0, extra_body={
        "ignore_eos": True})
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].finish_reason == "length" and isinstance(r.choices[0].text, str)

    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5 w6"}],
                                       max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "w5 w6"}],
                                             add_generation_prompt=True, tokenize=True)
    chat_ids = chat_ids["input_ids"] if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys") else chat_ids
    assert c.usage.prompt_tokens == len(chat_ids) and c.usage.completion_tokens == 5
    assert c.choices[0].message.role == "assistant"

    # the same greedy request as token ids gives the same text
    r2 = client.completions.create(model="tiny", prompt=tokenizer.encode(prompt), max_tokens=7, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == r.choices[0].text


def test_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="w7 w8 w9 w10", max_tokens=9, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert sum(1 for c in chunks if c.choices) == 9  # one chunk per token
    assert chunks[-1].usage.completion_tokens == 9 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"

    chat_kw = dict(model="tiny", messages=[{"role": "user", "content": "w5"}], max_tokens=6, temperature=0,
                   extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**chat_kw)
    parts = list(client.chat.completions.create(stream=True, **chat_kw))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == whole.choices[0].message.content
    assert parts[0].choices[0].delta.role == "assistant"
    assert parts[-1].usage.completion_tokens == 6  # usage rides on the last chunk without include_usage


def test_n_seed_logprobs_and_stop(client):
    r = client.completions.create(model="tiny", prompt="w11 w12", max_tokens=6, n=3, temperature=1.0, seed=11,
                                  extra_body={"ignore_eos": True})
    again = client.completions.create(model="tiny", prompt="w11 w12", max_tokens=6, n=3, temperature=1.0,
                                      seed=11, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert r.usage.completion_tokens == 18

    lp = client.completions.create(model="tiny", prompt="w11 w12", max_tokens=4, temperature=0, logprobs=2,
                                   extra_body={"ignore_eos": True})
    lps = lp.choices[0].logprobs
    assert len(lps.tokens) == 4 and len(lps.token_logprobs) == 4 and all(x <= 0 for x in lps.token_logprobs)
    for tok, top, val in zip(lps.tokens, lps.top_logprobs, lps.token_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(val)  # greedy: the sampled token is top-1

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=1, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob)

    free = client.completions.create(model="tiny", prompt="w11 w12", max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = free.split()
    stop_word = words[2] if len(words) > 2 else words[-1]
    cut = client.completions.create(model="tiny", prompt="w11 w12", max_tokens=12, temperature=0, stop=[stop_word],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == free[: free.find(stop_word)]
    assert cut.choices[0].finish_reason == "stop"


def test_32_concurrent_streams_equal_alone(base_url, client, tokenizer):
    prompts = [" ".join(tokenizer.convert_ids_to_tokens([6 + (i * 7 + j) % 40 for j in range(1 + i % 9)]))
               for i in range(32)]
    lens = [3 + (i * 5) % 13 for i in range(32)]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p, n in zip(prompts, lens)]

    results = concurrent_streams(base_url, "tiny", prompts, lens, timeout=120)
    assert [r[0] for r in results] == alone
    assert [r[1] for r in results] == lens and [r[2] for r in results] == lens
    assert _metric(base_url, "flap:num_requests_running") == 0


def _post(base_url: str, path: str, body, headers=None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(base_url + path, content=content, headers={"content-type": "application/json", **(headers or {})},
                      timeout=30)


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_malformed_json_is_400(base_url):
    _assert_error(_post(base_url, "/completions", b'{"prompt": "hi", '), 400)
    _assert_error(_post(base_url, "/completions", b"[1, 2]"), 400)


def test_unknown_model_is_404_model_not_found(base_url, client):
    err = _assert_error(_post(base_url, "/completions", {"model": "gpt-9", "prompt": "hi"}), 404, "model")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_max_tokens_not_positive_is_400(base_url, max_tokens):
    _assert_error(_post(base_url, "/completions", {"prompt": "hi", "max_tokens": max_tokens}), 400, "max_tokens")
    _assert_error(_post(base_url, "/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": max_tokens}), 400, "max_tokens")


def test_a_request_beyond_the_context_is_400(base_url, client):
    err = _assert_error(_post(base_url, "/completions", {"prompt": "w11 w12", "max_tokens": 63}), 400, "max_tokens")
    assert "maximum context length is 64" in err["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="w1 " * 70, max_tokens=1)


@pytest.mark.parametrize("field,value", [("max_tokens", "many"), ("temperature", "hot"), ("n", [1]),
                                         ("stream", {"a": 1}), ("stop", 5), ("prompt", 3.5), ("seed", "x"),
                                         ("temperature", 9.0), ("top_p", 0)])
def test_wrong_field_types_are_400_naming_the_field(base_url, field, value):
    body = {"prompt": "hi", "max_tokens": 2, field: value}
    _assert_error(_post(base_url, "/completions", body), 400, field)


def test_unknown_extra_fields_are_accepted(base_url):
    r = _post(base_url, "/completions", {"prompt": "hi", "max_tokens": 2, "repetition_penalty": 1.0, "foo": [1]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_unknown_route_uses_error_body(base_url):
    _assert_error(httpx.get(base_url + "/nothing"), 404)


def test_requests_without_the_api_key_are_401_and_health_stays_open(tokenizer):
    with running(create_app(_server(tokenizer, api_key=KEY))) as url:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            err = _assert_error(_post(url, "/completions", {"prompt": "hi", "max_tokens": 1}, headers), 401)
            assert err["code"] == "invalid_api_key"
        _assert_error(httpx.get(url + "/models"), 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="nope", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(url[:-3] + "/health").status_code == 200  # health stays open for probes


def test_queue_full_is_503_and_a_request_that_never_fits_is_400(tokenizer):
    class Slow(TinyNumpyLM):  # the running and the queued request are surely still there
        def forward(self, *args):
            time.sleep(0.05)
            return super().forward(*args)

    server = OnnxServer(Slow(vocab=len(tokenizer)), tokenizer,
                        OnnxServerSettings(model="tiny", max_model_len=64, max_num_seqs=1, max_queue=1))
    with running(create_app(server)) as url:
        body = {"prompt": "hi", "max_tokens": 3, "n": 3}  # three sequences can never be queued at once
        err = _assert_error(_post(url, "/completions", body), 400, "n")
        assert "--max-queue" in err["message"]
        long = {"prompt": "hi", "max_tokens": 60, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/completions", json=long, timeout=30) as running_one:
            lines = running_one.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # it holds the only slot
            with httpx.stream("POST", url + "/completions", json=long, timeout=30):  # the only queue place
                deadline = time.time() + 10
                while server.engine.stats()["waiting"] < 1 and time.time() < deadline:
                    time.sleep(0.01)
                err = _assert_error(_post(url, "/completions", {"prompt": "hi", "max_tokens": 3}), 503)
                assert err["code"] == "overloaded"
        # the closed streams leave within a decode step or two; then the server takes requests again
        deadline = time.time() + 10
        while (status := _post(url, "/completions", {"prompt": "hi", "max_tokens": 3}).status_code) == 503 \
                and time.time() < deadline:
            time.sleep(0.1)
        assert status == 200


def test_disconnect_mid_stream_frees_the_slot(tokenizer):
    class Slow(TinyNumpyLM):  # so that the stream is surely still running when the client leaves
        def forward(self, *args):
            time.sleep(0.01)
            return super().forward(*args)

    server = OnnxServer(Slow(vocab=len(tokenizer)), tokenizer,
                        OnnxServerSettings(model="tiny", max_model_len=256, max_num_seqs=1))
    with running(create_app(server)) as url:
        body = {"prompt": "hi", "max_tokens": 250, "stream": True, "ignore_eos": True, "temperature": 0}
        with httpx.stream("POST", url + "/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(3)]
            assert any(line.startswith("data: ") for line in got)
        # the only slot is free again: the next request is served, and nothing is left running
        r = _post(url, "/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
        deadline = time.time() + 10
        while _metric(url, "flap:num_requests_running") != 0 and time.time() < deadline:
            time.sleep(0.05)
        assert _metric(url, "flap:num_requests_running") == 0
        assert _metric(url, "flap:num_requests_waiting") == 0
        assert _metric(url, "flap:requests_aborted_total") == 1
        assert server.engine.stats() == {"running": 0, "waiting": 0}
