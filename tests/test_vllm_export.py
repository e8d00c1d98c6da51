"""`flap-deploy export vllm`: validation, dtype conversion, README, imports from other pruners."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import save_file

from cli_util import one_line_error
from exporters.vllm.export import export_vllm
from factories import tiny_dense, tiny_heterogeneous
from flap_deploy.io.checkpoint import save_checkpoint, validate_checkpoint
from flap_deploy_cli import main
from flap_deploy.model.layout import LayerMask
from flap_deploy.pruning.compress import compress
from flap_deploy.io.convert import import_per_layer_checkpoint
from flap_deploy.errors import FlapDeployError
from flap_deploy.io.model_ref import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_checkpoint(tiny_heterogeneous(head_dim=32), tmp_path_factory.mktemp("exp") / "tiny")


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


IDS = [3, 17, 99, 4, 56, 7, 21, 88, 1, 42]


def test_export_bf16_with_readme(tiny_dir, tmp_path):
    out = tmp_path / "vllm"
    summary = export_vllm(tiny_dir, out, dtype="bfloat16", tp_size=2)
    cfg = validate_checkpoint(out)
    assert cfg["dtype"] == "bfloat16" and summary["tp_size"] == 2
    readme = (out / "README.md").read_text()
    assert "flap-deploy serve" in readme and "--tp-size 2" in readme
    exported = load_model(out)
    assert exported.dtype == torch.bfloat16
    ref = _logits(load_model(tiny_dir), IDS)
    torch.testing.assert_close(_logits(exported, IDS), ref, atol=0.1, rtol=0.05)


def test_export_refuses_tp_violation_and_writes_nothing(tiny_dir, tmp_path):
    out = tmp_path / "vllm"
    with pytest.raises(FlapDeployError, match=r"layer 2: 2 query heads are not divisible by tensor-parallel size 4"):
        export_vllm(tiny_dir, out, tp_size=4)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_export_one_line_error(tiny_dir, tmp_path):
    one_line_error(CliRunner().invoke(main, ["export", "vllm", str(tiny_dir), str(tmp_path / "o"), "--tp-size", "4"]),
                   "layer 2: 2 query heads are not divisible by tensor-parallel size 4")
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["export", "vllm", str(tiny_dir), str(tmp_path / "o"), "--dtype", "float32", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["dtype"] == "float32"


def _foreign(model, out: Path, model_type: str, cfg_keys: dict) -> Path:
    """Write a pruned model the way other pruners do: source family config, per-layer shapes."""
    out.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, out / "model.safetensors")
    src = model.config.flap["source_config"]
    cfg = transformers.CONFIG_MAPPING[model_type](
        vocab_size=model.config.vocab_size, hidden_size=model.config.hidden_size,
        num_hidden_layers=model.config.num_hidden_layers, num_attention_heads=src["num_attention_heads"],
        num_key_value_heads=src["num_key_value_heads"], intermediate_size=src["intermediate_size"],
        tie_word_embeddings=model.config.tie_word_embeddings, rms_norm_eps=model.config.rms_norm_eps,
        max_position_embeddings=model.config.max_position_embeddings,
    ).to_dict()
    cfg.update(architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]], **cfg_keys)
    if model_type == "llama":
        cfg.update(attention_bias=model.config.attention_bias, head_dim=model.config.head_dim)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_import_llama_with_per_layer_config_keys(tmp_path):
    model = tiny_heterogeneous(head_dim=32)
    c = model.config
    foreign = _foreign(model, tmp_path / "llm_pruner", "llama",
                       {"layer_head_num": c.num_attention_heads_per_layer,
                        "layer_inter_size": c.intermediate_size_per_layer})
    imported = import_per_layer_checkpoint(foreign)
    assert imported.config.num_key_value_heads_per_layer == c.num_key_value_heads_per_layer
    torch.testing.assert_close(_logits(imported, IDS), _logits(model, IDS))

    out = tmp_path / "served"
    summary = export_vllm(foreign, out, dtype="float32")
    assert summary["origin"] == "imported from llama"
    torch.testing.assert_close(_logits(load_model(out), IDS), _logits(model, IDS))


def test_import_checks_config_lists_against_shapes(tmp_path):
    model = tiny_heterogeneous(head_dim=32)
    wrong = list(model.config.intermediate_size_per_layer)
    wrong[3] += 2
    foreign = _foreign(model, tmp_path / "bad", "llama", {"layer_inter_size": wrong})
    with pytest.raises(FlapDeployError, match=r"'layer_inter_size' layer 3 says 50, the weights have 48"):
        import_per_layer_checkpoint(foreign)


def test_import_qwen2_widths_only_in_shapes(tmp_path):
    dense = tiny_dense("qwen2")
    heads = torch.tensor([1, 1, 0, 0], dtype=torch.bool)  # one KV group kept
    masks = [LayerMask(heads=heads if i != 1 else None, mlp=torch.arange(96) % (i + 2) != 0) for i in range(3)]
    pruned = compress(dense, masks)
    foreign = _foreign(pruned, tmp_path / "qwen2", "qwen2", {})
    imported = import_per_layer_checkpoint(foreign)
    assert imported.config.attention_bias and imported.config.tie_word_embeddings
    assert imported.config.num_attention_heads_per_layer == pruned.config.num_attention_heads_per_layer
    assert imported.config.intermediate_size_per_layer == pruned.config.intermediate_size_per_layer
    torch.testing.assert_close(_logits(imported, IDS), _logits(pruned, IDS))


def test_export_rejects_non_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FlapDeployError, match="not a model checkpoint"):
        export_vllm(tmp_path / "empty", tmp_path / "o")
