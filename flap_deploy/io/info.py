"""What a pruned checkpoint holds: per-layer widths, parameter counts, provenance, a plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flap_deploy.io.card import KV_ELEMENT_BYTES
from flap_deploy.io.model_ref import CHECKPOINTS, ModelRef, resolve_model
from flap_deploy.model.config import as_flap_config, dense_config
from flap_deploy.model.params import count_params, kv_bytes_per_token


def checkpoint_report(model: str | os.PathLike | ModelRef) -> dict[str, Any]:
    """Widths, dense widths, parameter counts, KV-cache bytes per token (at the model card's 16-bit cache)
    and provenance of a checkpoint (pruned or dense)."""
    ref = resolve_model(model, accept=CHECKPOINTS)
    path, cfg = ref.path, ref.config
    if ref.kind == "dense":
        cfg = as_flap_config(cfg)
    dense = dense_config(cfg)
    pruned_counts, dense_counts = count_params(cfg), count_params(dense)
    kv_pruned, kv_dense = (kv_bytes_per_token(c, KV_ELEMENT_BYTES) for c in (cfg, dense))
    layers = [
        {"layer": i, "heads": q, "kv_heads": kv, "mlp": m,
         "dense_heads": dense["num_attention_heads"], "dense_kv_heads": dense["num_key_value_heads"],
         "dense_mlp": dense["intermediate_size"]}
        for i, (q, kv, m) in enumerate(zip(cfg["num_attention_heads_per_layer"], cfg["num_key_value_heads_per_layer"],
                                           cfg["intermediate_size_per_layer"]))
    ]
    return {
        "path": str(path),
        "layers": layers,
        "params": {
            "dense": vars(dense_counts),
            "pruned": vars(pruned_counts),
            "decoder_linear_removed": 1 - pruned_counts.decoder_linear / dense_counts.decoder_linear,
            "total_removed": 1 - pruned_counts.total / dense_counts.total,
        },
        "kv_bytes_per_token": {"element_bytes": KV_ELEMENT_BYTES, "dense": kv_dense, "pruned": kv_pruned,
                               "saving": 1 - kv_pruned / kv_dense},
        "provenance": cfg.get("flap") or {},
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the report for the terminal."""
    lines = [f"checkpoint: {report['path']}", "", f"{'layer':>5}  {'q heads':>9}  {'kv heads':>9}  {'mlp width':>11}"]
    for row in report["layers"]:
        lines.append(
            f"{row['layer']:>5}  {row['heads']:>4}/{row['dense_heads']:<4}  {row['kv_heads']:>4}/{row['dense_kv_heads']:<4}"
            f"  {row['mlp']:>5}/{row['dense_mlp']:<5}"
        )
    p, kv = report["params"], report["kv_bytes_per_token"]
    kv_row = f"KV cache B/token ({8 * kv['element_bytes']}-bit)"
    lines += [
        "",
        f"{'parameters':<24}{'dense':>14}{'pruned':>14}",
        f"{'total':<24}{p['dense']['total']:>14,}{p['pruned']['total']:>14,}",
        f"{'decoder layers':<24}{p['dense']['decoder']:>14,}{p['pruned']['decoder']:>14,}",
        f"{'decoder linear weights':<24}{p['dense']['decoder_linear']:>14,}{p['pruned']['decoder_linear']:>14,}",
        f"{kv_row:<24}{kv['dense']:>14,}{kv['pruned']:>14,}",
        f"removed: {100 * p['decoder_linear_removed']:.2f} % of decoder linear weights, "
        f"{100 * p['total_removed']:.2f} % of all parameters; KV cache per token {100 * kv['saving']:.2f} % smaller",
    ]
    prov = report["provenance"]
    if prov:
        lines += ["", "provenance:"]
        lines += [f"  {k}: {v}" for k, v in prov.items() if k != "source_config"]
    return "\n".join(lines)


def plot_widths(report: dict[str, Any], out: str | os.PathLike) -> Path:
    """PNG of kept query heads, KV heads and MLP width per layer next to the dense widths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["layers"]
    x = [r["layer"] for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.3 * len(rows) + 4), 6), sharex=True)
    ax = axes[0]
    ax.bar(x, [r["dense_heads"] for r in rows], color="#d9d9d9", label="dense query heads")
    ax.bar(x, [r["heads"] for r in rows], color="#3b75af", label="kept query heads")
    ax.plot(x, [r["kv_heads"] for r in rows], "o", color="#e1812c", label="kept KV heads")
    ax.set_ylabel("heads")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax = axes[1]
    ax.bar(x, [r["dense_mlp"] for r in rows], color="#d9d9d9", label="dense MLP width")
    ax.bar(x, [r["mlp"] for r in rows], color="#519e3e", label="kept MLP width")
    ax.set_ylabel("MLP channels")
    ax.set_xlabel("layer")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    removed = 100 * report["params"]["decoder_linear_removed"]
    fig.suptitle(f"{Path(report['path']).name}: {removed:.1f} % of decoder linear weights removed")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
