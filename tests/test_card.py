"""Model cards: README.md with the Hub's metadata in every pruned checkpoint and export, its figures
those of the provenance and the config, measured results added only by a measurement."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from factories import tiny_dense, tiny_heterogeneous
from huggingface_hub import ModelCard
from serving_util import tiny_tokenizer

from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy.model.config import dense_config
from flap_deploy.model.params import kv_bytes_per_token
from flap_deploy_cli import main

SOURCE_CARD = "---\nlicense: apache-2.0\n---\n# the dense model\n"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny model with a tokenizer and a licensed card, pruned 30 % by the CLI."""
    root = tmp_path_factory.mktemp("card")
    tiny_dense("llama").save_pretrained(root / "dense")
    tiny_tokenizer(root / "dense")
    (root / "dense" / "README.md").write_text(SOURCE_CARD)
    res = CliRunner().invoke(main, ["prune", str(root / "dense"), str(root / "pruned"), "--ratio", "0.3",
                                    "--nsamples", "8", "--seqlen", "16", "--json"])
    assert res.exit_code == 0, res.output
    return root


def front_matter(readme: str) -> dict:
    _, meta, _ = readme.split("---\n", 2)
    return yaml.safe_load(meta)


def table_row(readme: str, label: str) -> list[str]:
    (line,) = [line for line in readme.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_the_pruned_checkpoint_card_states_the_provenance(pruned):
    out = pruned / "pruned"
    config = json.loads((out / "config.json").read_text())
    p = config["flap"]
    readme = (out / "README.md").read_text()
    meta = front_matter(readme)
    assert meta["base_model"] == p["source_model"] == str(pruned / "dense")
    assert (meta["base_model_relation"], meta["library_name"], meta["pipeline_tag"], meta["license"]) == \
        ("pruned", "transformers", "text-generation", "apache-2.0")
    assert {"flap", "pruned", "llama"} <= set(meta["tags"])
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == p["source_model"] and card.data.license == "apache-2.0"
    dense, kept, saving = table_row(readme, "parameters")
    assert (int(dense.replace(",", "")), int(kept.replace(",", ""))) == (p["dense_params"], p["pruned_params"])
    assert saving == f"{100 * (1 - p['pruned_params'] / p['dense_params']):.1f} %"
    dense_kv, kept_kv, _ = table_row(readme, "KV cache per token (16-bit)")
    assert (dense_kv, kept_kv) == (f"{kv_bytes_per_token(dense_config(config), 2):,} B",
                                   f"{kv_bytes_per_token(config, 2):,} B")
    assert table_row(readme, "pruning ratio") == [f"{100 * p['achieved_ratio']:.1f} % of decoder linear weights "
                                                  f"removed (target {100 * p['target_ratio']:.1f} %)"]
    calibration = p["calibration"]
    assert table_row(readme, "calibration") == [f"{calibration['source']}, {calibration['samples']} windows × "
                                                f"{calibration['seqlen']} tokens, seed {calibration['seed']}"]
    assert f'from_pretrained("{out}")' in readme and f"vllm serve {out}\n" in readme
    assert "## Measured" not in readme  # nothing was measured yet
    assert "![per-layer widths](flap_widths.png)" in readme and (out / "flap_widths.png").is_file()


def test_kv_bytes_per_token_is_what_the_kv_cache_holds():
    """Counted from the cache a forward pass fills, per layer that has attention."""
    model = tiny_heterogeneous()
    tokens = 7
    with torch.no_grad():
        cache = model(torch.arange(tokens)[None], use_cache=True).past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert kv_bytes_per_token(model.config.to_dict(), 4) * tokens == held
    assert kv_bytes_per_token(dense_config(model.config.to_dict()), 2) == 4 * 2 * 2 * model.config.head_dim * 2


def test_eval_card_adds_the_measured_perplexity_once_per_setting(pruned, tmp_path):
    out = pruned / "pruned"
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{(7 * i) % 100}" for i in range(400)))
    args = ["eval", str(out), "--text", str(text), "--seqlen", "32", "--compare", str(pruned / "dense"), "--card",
            "--json"]
    for _ in range(2):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
    measured = json.loads(res.stdout)
    readme = (out / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| text.txt |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:7] == [f"{measured['tokens']:,} × 32", f"{measured['perplexity']:.3f}", str(pruned / "dense"),
                          f"{measured['reference_perplexity']:.3f}", f"{measured['kl']:.4f}",
                          f"{100 * measured['top1_agreement']:.1f} %"]
    assert ModelCard.load(out / "README.md").data.base_model == str(pruned / "dense")


def test_eval_card_on_a_dense_model_is_refused_before_measuring(pruned, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("w1 " * 100)
    res = CliRunner().invoke(main, ["eval", str(pruned / "dense"), "--text", str(text), "--card"])
    assert res.exit_code == 2 and res.output.strip() == \
        f"error: --card: {pruned / 'dense'} is a dense checkpoint without a model card"
    assert (pruned / "dense" / "README.md").read_text() == SOURCE_CARD


@pytest.mark.parametrize("command, flags, library", [
    (["export", "vllm"], ["--tp-size", "2"], "transformers"),
    (["quantize"], [], "transformers"),
    (["export", "onnx"], ["--no-verify"], "onnx"),
])
def test_every_export_carries_the_card_of_its_checkpoint(tmp_path, command, flags, library):
    model = tiny_heterogeneous(head_dim=32)
    source = tmp_path / "pruned"
    model.config.flap = {**(model.config.flap or {}), "method": "flap", "source_model": "org/dense",
                         "source_architecture": "LlamaForCausalLM", "achieved_ratio": 0.4, "target_ratio": 0.4,
                         "dense_params": 100_000, "pruned_params": 60_000,
                         "source_config": {"num_attention_heads": 8, "num_key_value_heads": 2,
                                           "intermediate_size": 96, "head_dim": 32}}
    save_checkpoint(model, source, tokenizer=tiny_tokenizer())
    (source / "README.md").write_text(SOURCE_CARD)
    out = tmp_path / "export"
    res = CliRunner().invoke(main, [*command, str(source), str(out), *flags])
    assert res.exit_code == 0, res.output
    card = ModelCard.load(out / "README.md")
    assert (card.data.base_model, card.data.library_name, card.data.license) == ("org/dense", library, "apache-2.0")
    assert table_row(card.content, "parameters") == ["100,000", "60,000", "40.0 %"]
    if flags[:1] == ["--tp-size"]:
        assert f"vllm serve {out} --tensor-parallel-size 2" in card.content
