"""The demo's quick ONNX path end to end (`python -m flap_deploy_cli.demo --quick --backend onnx`): every
stage runs and the report holds positive ratios under the exact recipe of the pruned model.

`make demo` serves on vLLM where it is installed; that path is covered step by step by the vLLM tests:
`export vllm` of the pruned bundled model, `serve` with compare's flags and compare's load generator
(tests/test_vllm_serve.py), both without the two engine starts of a full demo.
"""

import json
import subprocess
import sys

import pytest

from flap_deploy.pruning.config import PruneConfig
from flap_deploy.pruning.recipes import describe_recipe

pytestmark = pytest.mark.slow


def test_quick_onnx_demo_runs_every_stage_and_names_the_recipe(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "flap_deploy_cli.demo", "--quick", "--backend", "onnx", "--out", str(out)],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    summary = json.loads((out / "demo.json").read_text())
    assert summary["backend"] == "onnx" and summary["quick"]

    # the shipped defaults but the calibration windows, and the figures printed under that recipe
    pruned = json.loads((out / "pruned" / "config.json").read_text())
    defaults = PruneConfig()
    assert summary["recipe"] == describe_recipe(pruned) and f"pruned model: {summary['recipe']}" in res.stdout
    provenance = pruned["flap"]
    assert (provenance["method"], provenance["reconstruction"]["mode"], provenance["target_ratio"]) == (
        defaults.method, defaults.reconstruct, defaults.ratio)
    assert provenance["calibration"]["source"] == defaults.calib and provenance["calibration"]["samples"] < defaults.nsamples
    assert abs(summary["achieved_ratio"] - defaults.ratio) <= 0.005

    assert summary["ideal_speedup"] > 1.0
    assert summary["speedup"] and all(v is not None and v > 0 for v in summary["speedup"].values())
    report = json.loads((out / "compare" / "report.json").read_text())
    assert report["backend"] == "onnx" and report["pruned"] == summary["onnx"]
    assert all(r["output_throughput_ratio"] > 0 for r in report["ratios"])
    assert all(m["failed"] == 0 for rows in report["medians"].values() for m in rows)
    for name in ("report.md", "throughput.png", "latency.png"):
        assert (out / "compare" / name).is_file()
    assert (out / "onnx-pruned" / "flap_onnx.json").is_file() and (out / "vllm-pruned" / "config.json").is_file()
    assert 0 < summary["quality_self_text"]["top1_agreement"] <= 1
    if summary["tasks"] is not None:  # WikiText-2 is in ../shared/data: the lm-eval task step ran
        assert {r["task"] for r in summary["tasks"]["comparison"]} == {"wikitext_cloze", "wikitext_ending"}
        assert (out / "tasks.png").is_file() and "wikitext_cloze" in res.stdout
    assert "ideal speed-up" in res.stdout
