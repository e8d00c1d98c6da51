"""A long prompt's memory goes back (bundled SmolLM2 export, vocabulary 49,152; a probe of issue 13)."""

from __future__ import annotations

import time

import httpx
import pytest
from serving_util import running

from flap_deploy.streaming.memory import rss_bytes

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

GIB = 1 << 30


def test_rss_returns_after_a_3000_token_prompt(bundled_dir):
    from exporters.onnx.export import ensure_onnx
    from serving.onnx.app import create_app
    from serving.onnx.server import load_onnx_server
    from serving.onnx.settings import OnnxServerSettings

    server = load_onnx_server(OnnxServerSettings(model=ensure_onnx(bundled_dir, progress=False),
                                                 served_model_name="smollm2", max_num_seqs=2, max_model_len=4096,
                                                 threads=2))
    with running(create_app(server)) as url:
        warm = httpx.post(url + "/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=120)
        assert warm.status_code == 200
        time.sleep(0.5)
        idle = rss_bytes()
        prompt = [(i * 7919) % 40000 + 100 for i in range(3000)]
        r = httpx.post(url + "/completions", json={"prompt": prompt, "max_tokens": 2, "ignore_eos": True},
                       timeout=600)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3000
        time.sleep(0.5)
        after = rss_bytes()
    assert after - idle < GIB, f"RSS idle {idle / GIB:.2f} GiB, after the prompt {after / GIB:.2f} GiB"
