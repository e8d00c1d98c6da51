"""Integration: the bundled SmolLM2-135M, pruned 20 % with FLAP, exported to ONNX in both graph forms (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from onnx_helpers import hf_greedy

from exporters.onnx import OnnxCausalLM, export_onnx
from exporters.onnx.manifest import MANIFEST_NAME
from flap_deploy.io.model_ref import load_model, load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "Write a short poem about the sea. The waves")


@pytest.fixture(scope="module")
def reference(flap20_dir):
    """(model, tokenizer, prompt ids, PyTorch's 32 greedy tokens of batch 2 left-padded and of the first alone)."""
    model, tokenizer = load_model(flap20_dir, dtype=torch.float32), load_tokenizer(flap20_dir)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    return model, tokenizer, prompts, hf_greedy(model, prompts, 32), hf_greedy(model, prompts[:1], 32)[0]


@pytest.fixture(scope="module", params=["gqa", "past-present"])
def pruned_export(request, flap20_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"bundled_onnx_{request.param}")
    return export_onnx(flap20_dir, root / "onnx", progress=False, attention=request.param)


def test_pruned_bundled_export_verifies(reference, pruned_export):
    model = reference[0]
    m = json.loads((pruned_export / MANIFEST_NAME).read_text())
    assert m["num_key_value_heads_per_layer"] == model.config.num_key_value_heads_per_layer
    assert len(set(m["num_key_value_heads_per_layer"])) > 1  # really heterogeneous
    v = m["verification"]["fp32"]
    assert v["relative_logit_diff"] <= 1e-3 and v["greedy_agreement"] == 1.0


def test_pruned_bundled_32_greedy_tokens_equal_pytorch(reference, pruned_export):
    _, tokenizer, prompts, want, want_alone = reference
    lm = OnnxCausalLM.from_dir(pruned_export, threads=2)
    got = lm.generate(prompts, max_tokens=32, ignore_eos=True)  # batch 2 of two lengths
    assert [g.token_ids for g in got] == want
    single = lm.generate(PROMPTS[0], max_tokens=32, ignore_eos=True)[0]  # batch 1, from text
    assert single.token_ids == want_alone
    assert single.text == tokenizer.decode(single.token_ids, skip_special_tokens=True)
