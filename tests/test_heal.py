"""`flap-deploy heal`: distillation lowers the KL to the teacher on held-out windows, the output is a regular pruned
checkpoint that generates the same greedy tokens in transformers and ONNX Runtime, runs resume to the same
weights, and bad input is a one-line error before any training with nothing written."""

import json
import shutil

import pytest
import torch
from cli_util import one_line_error, run_cli
from factories import VOCAB, tiny_dense
from onnx_helpers import hf_greedy, tiny_tokenizer
from safetensors.torch import load_file

from flap_deploy import PruneConfig, prune
from flap_deploy.evaluation.perplexity import evaluate_windows
from flap_deploy.heal import HealConfig, heal
from flap_deploy.model.registration import register_auto_classes

SETTINGS = dict(seqlen=24, batch_size=4, lr=2e-3, warmup_steps=5, progress=False)


def lively_dense():
    """The tiny Llama with larger weights, so that its distributions are far from uniform and greedy decoding
    does not settle on one token."""
    model = tiny_dense("llama", seed=3)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / p.shape[1] ** 0.5))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    lively_dense().save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    prune(str(root / "dense"), PruneConfig(ratio=0.4, nsamples=16, seqlen=24, batch_size=4, progress=False),
          out=root / "pruned")
    g = torch.Generator().manual_seed(5)
    (root / "data.txt").write_text(" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (4000,), generator=g)))
    return root


@pytest.fixture(scope="module")
def healed(models):
    result = heal(str(models / "pruned"), models / "healed",
                  HealConfig(teacher=str(models / "dense"), data="self", tokens=96 * 60, **SETTINGS))
    return result


def config_of(path):
    return json.loads((path / "config.json").read_text())


def test_heal_lowers_the_kl_to_the_teacher_on_held_out_windows(models, healed):
    held_out = torch.randint(0, VOCAB - 2, (8, 24), generator=torch.Generator().manual_seed(9))
    before, after = (evaluate_windows(str(p), held_out, reference=str(models / "dense"), progress=False).kl
                     for p in (models / "pruned", healed.path))
    assert after < 0.8 * before


def test_healed_checkpoint_keeps_the_widths_and_biases_and_records_the_heal(models, healed):
    pruned, out = config_of(models / "pruned"), config_of(healed.path)
    for key in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer",
                "o_proj_bias", "down_proj_bias"):
        assert out[key] == pruned[key], key
    before, after = load_file(str(models / "pruned" / "model.safetensors")), load_file(str(healed.path / "model.safetensors"))
    assert set(after) == set(before)  # adapters merged: no new tensors; compensation biases still biases
    assert any(name.endswith("o_proj.bias") for name in after)
    assert any(not torch.equal(after[n], before[n]) for n in after if n.endswith("q_proj.weight"))
    record = out["flap"]["heal"][-1]
    assert out["flap"]["method"] == pruned["flap"]["method"]
    assert record["teacher_path"] == str(models / "dense")
    assert record["data"]["source"] == "self" and record["tokens"] == 96 * 60 and record["steps"] == 60
    assert record["final_loss"] == pytest.approx(sum(healed.losses[-20:]) / 20)
    assert (healed.path / "README.md").read_text().startswith("---\n")  # its model card, like every pruned checkpoint


def test_healed_checkpoint_generates_the_same_greedy_tokens_in_transformers_and_onnx_runtime(healed, tmp_path):
    from transformers import AutoModelForCausalLM

    from exporters.onnx import OnnxCausalLM, export_onnx

    register_auto_classes()
    model = AutoModelForCausalLM.from_pretrained(healed.path).eval()
    prompts = [[5, 17, 3, 99, 42], [7, 7, 1]]
    want = hf_greedy(model, prompts, 16)
    assert len({t for row in want for t in row}) > 2  # not one repeated token
    out = export_onnx(healed.path, tmp_path / "onnx", progress=False)
    got = OnnxCausalLM.from_dir(out).generate(prompts, max_tokens=16, ignore_eos=True)
    assert [g.token_ids for g in got] == want


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(models, tmp_path, full):
    config = dict(teacher=str(models / "dense"), data=str(models / "data.txt"), full=full, checkpoint_every=3,
                  **SETTINGS)
    straight = heal(str(models / "pruned"), tmp_path / "straight", HealConfig(tokens=96 * 8, **config))
    state = tmp_path / "state"
    heal(str(models / "pruned"), tmp_path / "first", HealConfig(tokens=96 * 5, **config), state_dir=state,
         keep_state=True)
    assert state.is_dir()
    resumed = heal(str(models / "pruned"), tmp_path / "resumed", HealConfig(tokens=96 * 8, **config), state_dir=state,
                   resume=True)
    assert not state.exists()
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    a, b = load_file(str(straight.path / "model.safetensors")), load_file(str(resumed.path / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def other_teacher(models, tmp_path, *, vocab_size=None, shuffle=False):
    path = tmp_path / "other"
    shutil.copytree(models / "dense", path)
    if vocab_size is not None:
        cfg = config_of(path)
        cfg["vocab_size"] = vocab_size
        (path / "config.json").write_text(json.dumps(cfg))
    if shuffle:
        tok = json.loads((path / "tokenizer.json").read_text())
        vocab = tok["model"]["vocab"]
        words = sorted(vocab, key=vocab.get)
        tok["model"]["vocab"] = {w: vocab[words[(k + 1) % 4]] if k < 4 else vocab[w] for k, w in enumerate(words)}
        (path / "tokenizer.json").write_text(json.dumps(tok))
    return path


@pytest.mark.parametrize("case, needles", [
    ("teacher vocabulary", ["--teacher", "vocabulary of 96 tokens", "has 128"]),
    ("teacher tokenizer", ["--teacher", "tokenizer differs", "4 tokens"]),
    ("tokens below one batch", ["--tokens 50 is less than one batch (4 windows of 24 = 96 tokens)"]),
    ("data missing", ["--data", "nope.txt: no such file"]),
    ("data empty", ["--data", "empty"]),
])
def test_bad_input_is_a_one_line_error_before_training_and_writes_nothing(models, tmp_path, case, needles):
    teacher, data, tokens = models / "dense", "self", "960"
    if case == "teacher vocabulary":
        teacher = other_teacher(models, tmp_path, vocab_size=96)
    elif case == "teacher tokenizer":
        teacher = other_teacher(models, tmp_path, shuffle=True)
    elif case == "tokens below one batch":
        tokens = "50"
    elif case == "data missing":
        data = tmp_path / "nope.txt"
    elif case == "data empty":
        data = tmp_path / "empty.txt"
        data.write_text("\n \n")
    out = tmp_path / "out"
    res = run_cli("heal", models / "pruned", out, "--teacher", teacher, "--data", data, "--tokens", tokens,
                  "--seqlen", "24", "--batch-size", "4")
    one_line_error(res, *needles)
    assert "heal plan" not in res.stderr  # refused before the models were loaded
    assert not out.exists() and not (tmp_path / "out.heal-state").exists()
