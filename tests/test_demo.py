"""`make demo` end to end (quick workload): every stage runs and the report holds positive ratios."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_to_completion(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "flap_deploy_cli.demo", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    summary = json.loads((out / "demo.json").read_text())
    assert 0.15 < summary["achieved_ratio"] < 0.25
    assert summary["ideal_speedup"] > 1.0
    assert summary["speedup"] and all(v is not None and v > 0 for v in summary["speedup"].values())
    report = json.loads((out / "compare" / "report.json").read_text())
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
