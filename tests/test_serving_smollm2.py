"""The ONNX server on the bundled SmolLM2-135M-Instruct (exported once into the cache)."""

from __future__ import annotations

import asyncio

import openai
import pytest
from serving_util import running

from exporters.onnx.export import ensure_onnx
from serving.onnx.app import create_app
from serving.onnx.server import load_onnx_server
from serving.onnx.settings import OnnxServerSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(bundled_dir):
    server = load_onnx_server(OnnxServerSettings(model=ensure_onnx(bundled_dir, progress=False),
                                                 served_model_name="smollm2", max_num_seqs=4, max_model_len=512,
                                                 threads=2))
    with running(create_app(server)) as url:
        yield server, url


def test_chat_equals_exporter_generate(served):
    server, url = served
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16, temperature=0)
    ids = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = server.tokenizer.encode(ids, add_special_tokens=False)
    (ref,) = server.engine.model.generate([ids], max_tokens=16, temperature=0.0)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("stop" if ref.finish_reason == "stop" else "length")


def test_concurrent_streams_equal_alone(served):
    server, url = served
    prompts = ["The history of the Roman Empire", "Once upon a time", "Pruning a neural network means",
               "The quick brown fox", "In 1905, Albert Einstein"]
    lens = [12, 5, 9, 3, 7]
    client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)
    alone = [client.completions.create(model="smollm2", prompt=p, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p, n in zip(prompts, lens)]

    async def one(ac, p, n):
        stream = await ac.completions.create(model="smollm2", prompt=p, max_tokens=n, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        async for c in stream:
            if c.choices:
                text += c.choices[0].text
            if c.usage:
                usage = c.usage.completion_tokens
        return text, usage

    async def main():
        ac = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lens)))

    results = asyncio.run(main())
    assert [r[0] for r in results] == alone and [r[1] for r in results] == lens
