"""Writing a `compare` report: report.json, report.md, throughput and latency plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def format_table(report: dict[str, Any]) -> str:
    """The markdown table of throughput and latency medians per concurrency, with the ratios."""
    ideal = report["ideal_speedup"]
    lines = [
        "| concurrency | dense out tok/s | pruned out tok/s | speed-up | ÷ ideal | dense TTFT p50 ms | pruned TTFT p50 ms "
        "| dense TPOT p50 ms | pruned TPOT p50 ms | dense E2E p99 ms | pruned E2E p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["levels"]:
        d, p = row["dense"], row["pruned"]
        speed = row["speedup"]
        lines.append(
            f"| {row['concurrency']} | {d['output_throughput']:.1f} | {p['output_throughput']:.1f} | "
            f"{speed:.3f} | {speed / ideal:.3f} | {d['ttft_ms']['median']:.1f} | {p['ttft_ms']['median']:.1f} | "
            f"{d['tpot_ms']['median']:.2f} | {p['tpot_ms']['median']:.2f} | "
            f"{d['e2el_ms'].get('p99', float('nan')):.0f} | {p['e2el_ms'].get('p99', float('nan')):.0f} |"
        )
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# Dense vs pruned serving comparison",
        "",
        f"- dense: `{report['dense']}`",
        f"- pruned: `{report['pruned']}`",
        f"- backend: {report['backend']}; {cfg['num_prompts']} requests per level, {cfg['input_len']} input / "
        f"{cfg['output_len']} output tokens (ignore_eos), warm-up {cfg['warmup']}, {cfg['repeats']} interleaved "
        f"repeats (medians shown), seed {cfg['seed']}",
        f"- ideal speed-up (dense ÷ pruned weights read per decode step): **{report['ideal_speedup']:.3f}**",
        "- metric definitions as `vllm bench serve`: output tok/s = generated tokens ÷ wall time of the level; "
        "TTFT = time to first token; TPOT = (latency − TTFT) ÷ (output tokens − 1); E2E = request latency",
        "",
        format_table(report),
        "",
    ]
    q = report.get("quality")
    if q:
        lines += [
            f"Quality on `{q['text']}` ({q['tokens']} tokens, seqlen {q['seqlen']}, PyTorch fp32): "
            f"dense perplexity {q['reference_perplexity']:.2f}, pruned {q['perplexity']:.2f}, "
            f"mean KL(dense‖pruned) {q['kl']:.4f}, top-1 agreement {100 * q['top1_agreement']:.2f} %.",
            "",
        ]
    lines += ["Plots: `throughput.png`, `latency.png`; raw per-repeat results in `report.json`.", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    conc = [r["concurrency"] for r in levels]
    paths = []

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, color in (("dense", "#7f7f7f"), ("pruned", "#3b75af")):
        ax.plot(conc, [r[label]["output_throughput"] for r in levels], "o-", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens / s")
    ax.set_title("throughput")
    ax.legend()
    ax2.bar([str(c) for c in conc], [r["speedup"] or 0 for r in levels], color="#3b75af", label="measured")
    ax2.axhline(report["ideal_speedup"], color="#e1812c", ls="--", label=f"ideal {report['ideal_speedup']:.2f}")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("pruned ÷ dense output tok/s")
    ax2.set_title("speed-up")
    ax2.legend(loc="lower right")
    fig.suptitle(f"{report['backend']}: dense vs pruned")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    stats = [s for s in ("median", "p90", "p99") if s in levels[0]["dense"]["ttft_ms"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "tpot_ms", "TPOT")):
        width = 0.8 / (2 * len(stats))
        for j, stat in enumerate(stats):
            for k, (label, color) in enumerate((("dense", "#7f7f7f"), ("pruned", "#3b75af"))):
                xs = [i + (2 * j + k) * width for i in range(len(conc))]
                ax.bar(xs, [r[label][key][stat] for r in levels], width, color=color, alpha=0.45 + 0.25 * j,
                       label=f"{label} {stat}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(conc))], [str(c) for c in conc])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} percentiles")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(format_markdown(report))
    plot(report, out)
