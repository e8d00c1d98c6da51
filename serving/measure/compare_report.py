"""report.json, report.md and plots of a dense-vs-pruned serving comparison."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flap_deploy.io.atomic import atomic_directory


def _f(x: Any, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _servers(report: dict[str, Any]) -> str:
    """How the servers ran, and their start times."""
    mode = report["workload"].get("servers", "in-turn")
    starts = report.get("server_start_s") or {}
    text = ("both up for every repeat" if mode == "together"
            else "started in turn, one per model and repeat")
    took = "; ".join(f"{name} {', '.join(f'{s:.0f}' for s in secs)} s" for name, secs in starts.items() if secs)
    return f"{text} (start: {took})" if took else text


def _mb(weights: dict[str, Any], name: str) -> str:
    nbytes = weights.get(f"{name}_decode_bytes")
    return f" ({nbytes / 1e6:.1f} MB)" if nbytes else ""


def format_markdown(report: dict[str, Any]) -> str:
    w, wl = report["weights"], report["workload"]
    lines = [
        f"# Dense vs pruned serving ({report['backend']} backend)", "",
        f"- dense: `{report['dense']}`; pruned: `{report['pruned']}`",
        f"- workload `{wl['workload']}`: {wl['num_prompts']} requests per level, mean {wl['mean_input_len']:.0f} "
        f"input / {wl['mean_output_len']:.0f} output tokens (ignore_eos, greedy), prompts `{wl['prompts']}`, seed {wl['seed']}, concurrency "
        f"{', '.join(map(str, wl['concurrency']))}; max_num_seqs {wl['max_num_seqs']}; {wl['repeats']} interleaved "
        f"repeat(s), medians shown; servers {_servers(report)}",
        f"- weights read per decode step: dense {w['dense_decode_params'] / 1e6:.2f} M params"
        f"{_mb(w, 'dense')}, pruned {w['pruned_decode_params'] / 1e6:.2f} M params{_mb(w, 'pruned')}: "
        f"**ideal ratio {w['ideal_ratio']:.3f}x**", "",
        "## Measured vs ideal", "",
        "| concurrency | output tok/s ratio (pruned/dense) | TPOT ratio (dense/pruned) | E2E ratio | ideal |",
        "|---|---|---|---|---|",
    ]
    for r in report["ratios"]:
        lines.append(f"| {r['max_concurrency']} | {_f(r['output_throughput_ratio'], '.3f')} | "
                     f"{_f(r['tpot_ratio'], '.3f')} | {_f(r['e2el_ratio'], '.3f')} | {r['ideal_ratio']:.3f} |")
    slo = wl.get("slo")
    lines += ["", "## Figures (medians over repeats; times in ms)", "",
              *([f"Goodput: requests/s that met every bound of the SLO `{slo}`.", ""] if slo else []),
              "| model | concurrency | out tok/s | total tok/s | req/s | goodput | TTFT p50 | TTFT p99 | TPOT p50 | "
              "TPOT p99 | ITL p50 | E2E p50 | E2E p99 | failed |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("dense", "pruned"):
        for r in report["medians"][name]:
            lines.append(
                f"| {name} | {r['max_concurrency']} | {r['output_throughput']:.1f} | {r['total_token_throughput']:.1f} | "
                f"{r['request_throughput']:.2f} | {_f(r.get('request_goodput'), '.2f')} | {r['ttft_median_ms']:.0f} | "
                f"{r['ttft_p99_ms']:.0f} | "
                f"{r['tpot_median_ms']:.1f} | {r['tpot_p99_ms']:.1f} | {r['itl_median_ms']:.1f} | "
                f"{r['e2el_median_ms']:.0f} | {r['e2el_p99_ms']:.0f} | {r['failed']} |")
    q = report.get("quality")
    if q:
        lines += ["", "## Quality", "", f"On `{q['text']}` ({q.get('tokens', '?')} tokens, windows of {q['seqlen']}):", "",
                  "| dense ppl | pruned ppl | KL(dense‖pruned) nats/token | top-1 agreement |", "|---|---|---|---|",
                  f"| {_f(q.get('reference_perplexity'), '.3f')} | {_f(q.get('perplexity'), '.3f')} | "
                  f"{_f(q.get('kl'), '.4f')} | {_f(100 * q['top1_agreement'] if q.get('top1_agreement') is not None else None, '.2f')} % |"]
    lines += ["", "Plots: `throughput.png` (throughput vs concurrency), `latency.png` (latency percentiles)."]
    return "\n".join(lines) + "\n"


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in (("dense", "o-"), ("pruned", "s-")):
        rows = report["medians"][name]
        xs = [r["max_concurrency"] for r in rows]
        a.plot(xs, [r["output_throughput"] for r in rows], style, label=name)
    a.set_xscale("log", base=2)
    a.set_xlabel("max concurrency")
    a.set_ylabel("output tokens / s")
    a.legend()
    a.grid(alpha=0.3)
    xs = [r["max_concurrency"] for r in report["ratios"]]
    b.plot(xs, [r["output_throughput_ratio"] for r in report["ratios"]], "o-", label="measured (throughput)")
    b.plot(xs, [r["tpot_ratio"] for r in report["ratios"]], "s--", label="measured (TPOT)")
    b.axhline(report["weights"]["ideal_ratio"], color="k", ls=":", label="ideal (weight bytes)")
    b.axhline(1.0, color="grey", lw=0.5)
    b.set_xscale("log", base=2)
    b.set_xlabel("max concurrency")
    b.set_ylabel("pruned speed-up over dense")
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(f"Dense vs pruned, {report['backend']} backend")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_latency(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = [("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")]
    levels = [r["max_concurrency"] for r in report["medians"]["dense"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(14, 3.8))
    width = 0.2
    for ax, (key, title) in zip(axes, metrics):
        x = np.arange(len(levels))
        for j, (name, stat) in enumerate((("dense", "median"), ("pruned", "median"), ("dense", "p99"),
                                          ("pruned", "p99"))):
            col = f"{key}_{stat}_ms"
            vals = [r.get(col) for r in report["medians"][name]]
            if None in vals:
                continue
            ax.bar(x + (j - 1.5) * width, vals, width, label=f"{name} {stat}",
                   color=("C0" if name == "dense" else "C1"), alpha=1.0 if stat == "median" else 0.5)
        ax.set_xticks(x, [str(v) for v in levels])
        ax.set_xlabel("max concurrency")
        ax.set_title(f"{title} (ms)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_compare_report(report: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> Path:
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=1))
        (tmp / "report.md").write_text(format_markdown(report))
        plot_throughput(report, tmp / "throughput.png")
        plot_latency(report, tmp / "latency.png")
    return Path(out_dir)
