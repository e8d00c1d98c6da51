"""`flap-deploy info`: widths table, parameter counts, provenance, plot."""

import json

from cli_util import run_cli
from factories import tiny_heterogeneous
from flap_deploy.io.checkpoint import save_checkpoint
from flap_deploy.io.info import checkpoint_report


def test_report_counts_and_plot(tmp_path):
    model = tiny_heterogeneous()
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    report = checkpoint_report(ckpt)
    assert [r["heads"] for r in report["layers"]] == [8, 0, 2, 2]
    assert [r["mlp"] for r in report["layers"]] == [96, 96, 0, 48]
    pruned, dense = report["params"]["pruned"], report["params"]["dense"]
    assert pruned["total"] == sum(p.numel() for p in model.parameters())
    # dense: 4 layers x (64*16*(2*8+2*2) + 3*64*96)
    assert dense["decoder_linear"] == 4 * (64 * 16 * 20 + 3 * 64 * 96)
    assert 0 < report["params"]["decoder_linear_removed"] < 1

    res = run_cli("info", ckpt, "--json", "--plot", tmp_path / "w.png")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["params"] == json.loads(json.dumps(report["params"]))
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
