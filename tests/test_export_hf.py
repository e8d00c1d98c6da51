"""`export hf`: transformers' per-layer form. Stock transformers (no flap_deploy) reads the widths of
every layer from it, and FlapLlamaForCausalLM loads it back to the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from factories import tiny_dense

from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy.model.layout import LayerMask
from flap_deploy.model.modeling_flap_llama import FlapLlamaConfig, FlapLlamaForCausalLM
from flap_deploy.pruning.compress import LayerMeans, compress
from flap_deploy_cli import main

# Per layer: attention kept in part / MLP kept in part, MLP removed, attention removed.
MASKS = {
    "llama": lambda: [LayerMask(heads=torch.arange(8) < 4, mlp=torch.arange(96) % 2 == 0),
                      LayerMask(mlp=torch.zeros(96, dtype=torch.bool)),
                      LayerMask(heads=torch.zeros(8, dtype=torch.bool))],
    "qwen3": lambda: [LayerMask(heads=torch.arange(4) < 2, mlp=torch.arange(96) < 40),
                      LayerMask(heads=torch.zeros(4, dtype=torch.bool)),
                      LayerMask(mlp=torch.zeros(96, dtype=torch.bool))],
}

# Run in a fresh interpreter where flap_deploy cannot be imported: stock transformers alone.
STOCK = """
import json, sys
sys.modules["flap_deploy"] = None
from transformers import AutoConfig
config = AutoConfig.from_pretrained(sys.argv[1])
layers = config.per_layer_config
print(json.dumps({"model_type": config.model_type, "class": type(config).__name__,
                  "heads": [0 if "self_attn" in c.skip else c.num_attention_heads for c in layers],
                  "kv_heads": [0 if "self_attn" in c.skip else c.num_key_value_heads for c in layers],
                  "mlp": [0 if "mlp" in c.skip else c.intermediate_size for c in layers]}))
"""


def stock_widths(path) -> dict:
    res = subprocess.run([sys.executable, "-c", STOCK, str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def assert_round_trip(source, out, family: str) -> None:
    flap = json.loads((source / "config.json").read_text())
    stock = stock_widths(out)
    assert (stock["model_type"], stock["class"]) == (family, f"{family.capitalize()}Config")
    assert stock["heads"] == flap["num_attention_heads_per_layer"]
    assert stock["kv_heads"] == flap["num_key_value_heads_per_layer"]
    assert stock["mlp"] == flap["intermediate_size_per_layer"]
    exported = FlapLlamaForCausalLM.from_pretrained(out).eval()
    original = FlapLlamaForCausalLM.from_pretrained(source).eval()
    ids = torch.arange(1, 12)[None] % exported.config.vocab_size
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, original(ids).logits)
    for key in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer",
                "o_proj_bias", "down_proj_bias", "qk_norm", "attention_bias"):
        assert getattr(exported.config, key) == getattr(original.config, key), key


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_tiny_model_round_trips_through_the_per_layer_form(tmp_path, family):
    dense = tiny_dense(family)
    g = torch.Generator().manual_seed(1)
    hidden = dense.config.num_attention_heads * dense.config.head_dim
    means = [LayerMeans(attn=0.1 * torch.randn(hidden, generator=g), mlp=0.1 * torch.randn(96, generator=g))
             for _ in range(3)]
    source, out = tmp_path / "pruned", tmp_path / "hf"
    save_checkpoint(compress(dense, MASKS[family](), means), source)
    res = CliRunner().invoke(main, ["export", "hf", str(source), str(out), "--json"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert "num_attention_heads_per_layer" not in config and config["architectures"] == [dense.config.architectures[0]]
    assert config["per_layer_config"]["2"]["skip"] == (["self_attn"] if family == "llama" else ["mlp"])
    assert_round_trip(source, out, family)


def test_per_layer_config_and_width_lists_together_are_refused():
    with pytest.raises(ValueError, match="both per_layer_config and per-layer width lists"):
        FlapLlamaConfig(num_hidden_layers=2, num_attention_heads_per_layer=[1, 1],
                        per_layer_config={"0": {"intermediate_size": 8}})


def test_a_per_layer_attribute_flap_llama_cannot_vary_is_named():
    with pytest.raises(ValueError, match=r"layer 1: \['head_dim'\] cannot differ per layer"):
        FlapLlamaConfig(num_hidden_layers=2, per_layer_config={"1": {"head_dim": 32}})


@pytest.mark.slow
def test_the_bundled_flap20_model_round_trips(flap20_dir, tmp_path):
    out = tmp_path / "hf"
    res = CliRunner().invoke(main, ["export", "hf", str(flap20_dir), str(out)])
    assert res.exit_code == 0, res.output
    assert_round_trip(flap20_dir, out, "llama")
