"""Bad inputs: one-line errors naming the problem, non-zero exit, no traceback."""

import json

import pytest

from cli_util import one_line_error, run_cli
from factories import tiny_heterogeneous
from flap_deploy.io.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_heterogeneous(), tmp_path_factory.mktemp("ckpt") / "tiny")


def _edit_config(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_directory(tmp_path):
    one_line_error(run_cli("info", tmp_path / "nope"), "nope", "not found")


def test_per_layer_list_one_entry_short(checkpoint, tmp_path):
    bad = _edit_config(checkpoint, tmp_path / "bad", intermediate_size_per_layer=[96, 96, 0])
    one_line_error(run_cli("info", bad), "intermediate_size_per_layer", "3 entries", "num_hidden_layers is 4")


def test_query_heads_not_divisible_by_kv_heads(checkpoint, tmp_path):
    bad = _edit_config(checkpoint, tmp_path / "bad", num_key_value_heads_per_layer=[3, 0, 1, 2])
    one_line_error(run_cli("info", bad), "layer 0", "8 query heads are not a multiple of 3 KV heads")


def test_truncated_safetensors(checkpoint, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(checkpoint, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    one_line_error(run_cli("info", bad), "model.safetensors", "truncated")


def test_tensor_shape_mismatch_names_layer(checkpoint, tmp_path):
    bad = _edit_config(checkpoint, tmp_path / "bad", intermediate_size_per_layer=[96, 96, 0, 40])
    one_line_error(run_cli("info", bad), "layer 3", "mlp.gate_proj.weight")


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    one_line_error(run_cli("info", d), "unsupported architecture 'GPT2LMHeadModel'", "LlamaForCausalLM",
                   "Qwen3ForCausalLM")


def test_eval_text_shorter_than_one_window(checkpoint, tmp_path, bundled_dir):
    text = tmp_path / "short.txt"
    text.write_text("Just a few words.")
    one_line_error(run_cli("eval", bundled_dir, "--text", text, "--seqlen", "512"),
                   "fewer than one window of 512")


def test_eval_missing_text(tmp_path):
    one_line_error(run_cli("eval", "smollm2-135m", "--text", tmp_path / "none.txt"), "none.txt")
