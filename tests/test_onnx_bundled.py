"""Integration: the bundled SmolLM2-135M, pruned 20 % with FLAP, exported to ONNX in the default graph form (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from onnx_helpers import hf_greedy

from exporters.onnx import OnnxCausalLM
from exporters.onnx.export import ensure_onnx
from exporters.onnx.manifest import MANIFEST_NAME
from flap_deploy.io.model_ref import load_model, load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "Write a short poem about the sea. The waves")


@pytest.fixture(scope="module")
def pruned_export(flap20_dir):
    """The cached export (``ensure_onnx``: the default form, gqa), the one the Hub tests serve through the
    snapshot's links. One bundled export in CI: the past-present form's equality with PyTorch is shown on
    the tiny models (test_onnx_export.py), and on this model by ``benchmarks/onnx_speed.py``, which exports
    and verifies both forms."""
    out = ensure_onnx(flap20_dir, progress=False)
    return load_model(flap20_dir, dtype=torch.float32), load_tokenizer(flap20_dir), out


def test_pruned_bundled_export_verifies(pruned_export):
    model, _, out = pruned_export
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["attention"] == "gqa"  # the default form where the model allows it
    assert m["num_key_value_heads_per_layer"] == model.config.num_key_value_heads_per_layer
    assert len(set(m["num_key_value_heads_per_layer"])) > 1  # really heterogeneous
    v = m["verification"]["fp32"]
    assert v["relative_logit_diff"] <= 1e-3 and v["greedy_agreement"] == 1.0


def test_pruned_bundled_32_greedy_tokens_equal_pytorch(pruned_export):
    model, tokenizer, out = pruned_export
    lm = OnnxCausalLM.from_dir(out, threads=2)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    want = hf_greedy(model, prompts, 32)
    got = lm.generate(prompts, max_tokens=32, ignore_eos=True)  # batch 2 of two lengths
    assert [g.token_ids for g in got] == want
    single = lm.generate(PROMPTS[0], max_tokens=32, ignore_eos=True)[0]  # batch 1, from text
    assert single.token_ids == hf_greedy(model, prompts[:1], 32)[0]
    assert single.text == tokenizer.decode(single.token_ids, skip_special_tokens=True)
