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
    # KV heads [2, 0, 1, 2] of 2 per layer, head_dim 16, a 16-bit cache: 2 (K and V) x heads x 16 x 2 bytes
    assert report["kv_bytes_per_token"] == {"element_bytes": 2, "dense": 2 * 8 * 16 * 2,
                                            "pruned": 2 * 5 * 16 * 2, "saving": 3 / 8}

    res = run_cli("info", ckpt, "--json", "--plot", tmp_path / "w.png")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["params"] == json.loads(json.dumps(report["params"]))
    text = run_cli("info", ckpt)
    assert "KV cache B/token (16-bit)           512           320" in text.stdout
    assert "KV cache per token 37.50 % smaller" in text.stdout
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
