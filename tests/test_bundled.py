"""The bundled SmolLM2-135M: materialization, generation, a 20 % slice through every loader."""

import json
import time

import pytest
import torch
import transformers

import flap_deploy  # noqa: F401
from factories import logits_without_package
from flap_deploy.io.bundled import materialize
from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy.model.layout import LayerMask
from flap_deploy.pruning.compress import compress
from flap_deploy.io.model_ref import load_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dense(bundled_dir):
    return load_model(bundled_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(bundled_dir):
    return load_tokenizer(bundled_dir)


def test_materialized_once_as_plain_safetensors(bundled_dir):
    cfg = json.loads((bundled_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert list(bundled_dir.glob("*.safetensors")) and (bundled_dir / "tokenizer.json").is_file()
    start = time.perf_counter()
    assert materialize("smollm2-135m") == bundled_dir  # cached: no second conversion
    assert time.perf_counter() - start < 1.0


def test_bundled_model_greedily_answers_paris(dense, tokenizer):
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = dense.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_random_20_percent_slice_reloads_everywhere(dense, bundled_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = []
    for i in range(30):
        heads = torch.ones(9, dtype=torch.bool)
        if i % 2 == 0:
            heads[3 * (i % 3): 3 * (i % 3) + 3] = False  # drop one KV group
        masks.append(LayerMask(heads=heads, mlp=torch.rand(1536, generator=g) > 0.2))
    pruned = compress(dense, masks)
    out = save_checkpoint(pruned, tmp_path / "pruned", tokenizer_from=bundled_dir)

    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        want = pruned(ids).logits[0, -1]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits[0, -1], want)
    assert sum(p.numel() for p in reloaded.parameters()) < 0.9 * sum(p.numel() for p in dense.parameters())

    got = torch.tensor(logits_without_package(out, ids.tolist(), tmp_path))
    assert (got - want).abs().max().item() < 1e-4
