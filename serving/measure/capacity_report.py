"""capacity.json, capacity.md and capacity.png of a dense-vs-pruned capacity search, and its sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from flap_deploy.io.atomic import atomic_directory

CURVES = (("ttft", "TTFT"), ("tpot", "TPOT"))  # the rate-latency curves plotted: p50 and p99 of each


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def replicas(load: float, capacity: float | None) -> int | None:
    return math.ceil(load / capacity - 1e-9) if capacity else None


def capacity_text(cap: dict[str, Any]) -> str:
    """A found capacity in words: a figure, a bound where the search hit a limit, '(unfinished)' where its
    budget ran out before the bracket closed."""
    if cap["capacity"] is None:
        below = cap["search"]["min_rate"] if cap["complete"] else cap["failed_rate"]
        text = f"less than {below:.3g}"
    else:
        text = ("at least " if cap["limit"] == "max_rate" else "") + f"{cap['capacity']:.3g}"
    return text if cap["complete"] else f"{text} (unfinished)"


def deployer_sentence(report: dict[str, Any]) -> str:
    """The sentence a deployer needs: capacities at the SLO and workload, replicas for the stated load."""
    c, load = report["capacity"], report["fleet_load"]
    dense, pruned = c["dense"]["capacity"], c["pruned"]["capacity"]
    w = report["workload"]
    text = (f"At SLO {w['slo']} and workload {w['workload']} ({w['arrivals']}), one pruned replica serves "
            f"{capacity_text(c['pruned'])} req/s against {capacity_text(c['dense'])} for dense")
    if dense and pruned:
        # a capacity at the top rate tried is a lower bound, so its replica count is an upper one
        n = {name: ("at most " if c[name]["limit"] == "max_rate" else "") + str(replicas(load, c[name]["capacity"]))
             for name in ("dense", "pruned")}
        text += f": {n['pruned']} replicas instead of {n['dense']} for a load of {load:g} req/s"
    return text + "."


def format_markdown(report: dict[str, Any]) -> str:
    w, kv, cap = report["workload"], report["kv"], report["capacity"]
    s = cap["dense"]["search"]
    lines = [
        f"# Capacity at an SLO, dense vs pruned ({report['backend']} backend)", "",
        f"- dense: `{report['dense']}`; pruned: `{report['pruned']}`",
        f"- workload `{w['workload']}` (mean {w['mean_input_len']:.0f} input / {w['mean_output_len']:.0f} output "
        f"tokens, ignore_eos, greedy, prompts `{w['prompts']}`, seed {w['seed']}), {w['num_prompts']} requests per "
        f"rate, {w['arrivals']}, {w['repeats']} repeat(s) per rate (met = every repeat met), warm-up {w['warmup']}; "
        f"max_num_seqs {w['max_num_seqs']}, max_model_len {w['max_model_len'] or 'the model'}",
        f"- SLO `{w['slo']}`: a rate meets it when every stated percentile is within its bound and no request failed",
        f"- search: rates {s['start']:g} × (1 + {s['resolution']:g})^k within [{s['min_rate']:g}, {s['max_rate']:g}] "
        f"req/s, doubling to bracket the knee then bisecting; budget {s['budget_s']:g} s per model "
        "(unfinished: the budget ran out before the bracket closed)", "",
        "| model | capacity (req/s) | first failing rate | rates measured | search s | KV B/token | KV tokens | "
        "sequences of mean length that fit (batch bound) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("dense", "pruned"):
        c = cap[name]
        lines.append(f"| {name} | {capacity_text(c)} | {_f(c['failed_rate'], '.3g')} | {len(c['points'])} | "
                     f"{c['elapsed_s']:.0f} | {kv['kv_bytes_per_token'][name]:,} | "
                     f"{_f(kv['kv_cache_tokens'][name], ',')} | {_f(kv['sequences_that_fit'][name], ',')} "
                     f"({kv['batch_bound']}) |")
    lines += [
        "", "| capacity ratio (pruned / dense) | weight-only ideal | full ideal |", "|---|---|---|",
        f"| {_f(report['capacity_ratio'], '.3f')} | {kv['weight_only_ideal']:.3f} | {_f(kv['full_ideal'], '.3f')} |", "",
        f"Full ideal: dense ÷ pruned bytes of one decode step of {_f(kv['batch'], '.2f')} sequences (mean in flight "
        f"at the dense capacity, Little's law) of {kv['decode_context']:.0f} tokens of context (mean prompt + half "
        "the mean output): weights plus batch × context × KV bytes per token.", "",
        "## Every rate measured (times in ms)", "",
        "| model | offered req/s | met | completed req/s | goodput | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | "
        "E2E p99 | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("dense", "pruned"):
        for p in cap[name]["points"]:
            lines.append(f"| {name} | {p['rate']:.3g} | {'yes' if p['slo_met'] else 'no'} | "
                         f"{p['request_throughput']:.2f} | {p['request_goodput']:.2f} | {p['ttft_median_ms']:.0f} | "
                         f"{p['ttft_p99_ms']:.0f} | {p['tpot_median_ms']:.1f} | {p['tpot_p99_ms']:.1f} | "
                         f"{p['e2el_p99_ms']:.0f} | {p['failed']} |")
    lines += ["", "Plot: `capacity.png` (TTFT and TPOT p50 / p99 against offered rate, both models; dashed: the "
              "SLO's bound; dotted verticals: the capacities).", "", f"**{report['sentence']}**"]
    return "\n".join(lines) + "\n"


def draw(report: dict[str, Any], axes: Any) -> None:
    """TTFT and TPOT p50 / p99 against the offered rate, dense and pruned, onto two matplotlib axes: the
    SLO's bounds dashed, the capacities dotted (capacity.png, and each row of benchmarks/capacity.py's)."""
    from serving.measure.workload import parse_slo

    bounds = {(t.metric, t.percentile): t.ms for t in parse_slo(report["workload"]["slo"]).targets}
    for ax, (metric, title) in zip(axes, CURVES):
        for name, color in (("dense", "C0"), ("pruned", "C1")):
            points = report["capacity"][name]["points"]
            rates = [p["rate"] for p in points]
            for stat, style in (("median", "o-"), ("p99", "s:")):
                ax.plot(rates, [p[f"{metric}_{stat}_ms"] for p in points], style, color=color,
                        label=f"{name} {'p50' if stat == 'median' else stat}")
            if report["capacity"][name]["capacity"]:
                ax.axvline(report["capacity"][name]["capacity"], color=color, ls=":", lw=1)
        for pct in (50, 99):
            if (metric, pct) in bounds:
                ax.axhline(bounds[metric, pct], color="k", ls="--", lw=0.8, label=f"SLO p{pct}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel(f"{title} (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(11, 4))
    draw(report, axes)
    fig.suptitle(f"{report['workload']['workload']}, SLO {report['workload']['slo']} ({report['backend']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_capacity_report(report: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> Path:
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / "capacity.json").write_text(json.dumps(report, indent=1))
        (tmp / "capacity.md").write_text(format_markdown(report))
        plot(report, tmp / "capacity.png")
    return Path(out_dir)
