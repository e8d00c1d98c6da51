"""Printing and writing `bench` results: a console table, JSON, markdown and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flap_deploy.io.atomic import atomic_directory

_LAT = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E"))


def _pkeys(result: dict[str, Any]) -> list[str]:
    return ["mean", "median"] + [f"p{p:g}" for p in result["percentiles"] if p != 50]


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per run (no per-request data), for tables and comparisons."""
    rows = []
    for run in result["runs"]:
        row = {k: run.get(k) for k in ("max_concurrency", "request_rate", "burstiness", "completed", "failed",
                                       "duration_s", "total_input_tokens", "total_output_tokens",
                                       "request_throughput", "output_throughput", "total_token_throughput",
                                       "good", "request_goodput", "slo_met")}
        for key, _ in _LAT:
            for stat, value in run[key].items():
                row[f"{key[:-3]}_{stat}_ms"] = value
        rows.append(row)
    return rows


def describe_workload(result: dict[str, Any]) -> str:
    """The requests of a run in words: workload, mean lengths."""
    return (f"workload `{result.get('workload') or 'given requests'}` (mean {result['mean_input_len']:.0f} input / "
            f"{result['mean_output_len']:.0f} output tokens)")


def format_markdown(result: dict[str, Any], title: str = "Serving benchmark") -> str:
    pk = _pkeys(result)
    slo = result.get("slo")
    lines = [f"# {title}", "",
             f"Endpoint `{result['endpoint']}`, model `{result['model']}`; {result['num_prompts']} requests per run, "
             f"{describe_workload(result)}, ignore_eos={result['ignore_eos']}, "
             f"temperature={result['temperature']}, seed={result['seed']}, warm-up {result['warmup']}"
             + (f"; SLO `{slo}`." if slo else "."),
             "Definitions as `vllm bench serve` (times in ms; goodput: requests/s that met every SLO bound).", "",
             "| concurrency | rate (req/s) | burstiness | ok | failed | req/s | goodput | SLO met | out tok/s | "
             "total tok/s | " + " | ".join(f"{name} {s}" for _, name in _LAT for s in pk) + " |",
             "|" + "---|" * (10 + len(_LAT) * len(pk))]
    for run in result["runs"]:
        cells = [str(run["max_concurrency"] or "inf"), f"{run['request_rate']:g}", f"{run.get('burstiness', 1.0):g}",
                 str(run["completed"]), str(run["failed"]), f"{run['request_throughput']:.2f}",
                 f"{run['request_goodput']:.2f}" if slo else "-", ("yes" if run["slo_met"] else "no") if slo else "-",
                 f"{run['output_throughput']:.1f}", f"{run['total_token_throughput']:.1f}"]
        cells += [f"{run[key][s]:.1f}" for key, _ in _LAT for s in pk]
        lines.append("| " + " | ".join(cells) + " |")
    errors = {e: n for run in result["runs"] for e, n in run["errors"].items()}
    if errors:
        lines += ["", "Errors:"] + [f"- {n} x {e}" for e, n in errors.items()]
    return "\n".join(lines) + "\n"


def format_console(result: dict[str, Any]) -> str:
    out = []
    for run in result["runs"]:
        out.append(f"== concurrency {run['max_concurrency'] or 'inf'}, request rate {run['request_rate']:g}, "
                   f"burstiness {run.get('burstiness', 1.0):g} ==")
        out.append(f"{'Successful requests:':<34}{run['completed']}")
        out.append(f"{'Failed requests:':<34}{run['failed']}")
        out.append(f"{'Benchmark duration (s):':<34}{run['duration_s']:.2f}")
        out.append(f"{'Total input tokens:':<34}{run['total_input_tokens']}")
        out.append(f"{'Total generated tokens:':<34}{run['total_output_tokens']}")
        out.append(f"{'Request throughput (req/s):':<34}{run['request_throughput']:.2f}")
        if run.get("slo"):
            out.append(f"{'Request goodput (req/s):':<34}{run['request_goodput']:.2f}")
            out.append(f"{'SLO ' + run['slo'] + ':':<34}{'met' if run['slo_met'] else 'missed'}")
        out.append(f"{'Output token throughput (tok/s):':<34}{run['output_throughput']:.2f}")
        out.append(f"{'Total token throughput (tok/s):':<34}{run['total_token_throughput']:.2f}")
        for key, name in _LAT:
            stats = run[key]
            out.append(f"{name + ' (ms):':<34}" + "  ".join(f"{s} {stats[s]:.2f}" for s in _pkeys(result)))
        for e, n in run["errors"].items():
            out.append(f"error x{n}: {e}")
    return "\n".join(out)


def plot(result: dict[str, Any], path: Path, title: str = "Serving benchmark") -> None:
    """Throughput vs concurrency and latency percentiles (one PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    xs = [r["max_concurrency"] or 0 for r in runs]
    labels = [str(r["max_concurrency"] or "inf") for r in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(range(len(xs)), [r["output_throughput"] for r in runs], "o-", label="output tok/s")
    a.plot(range(len(xs)), [r["total_token_throughput"] for r in runs], "s--", label="total tok/s")
    a.set_xticks(range(len(xs)), labels)
    a.set_xlabel("max concurrency")
    a.set_ylabel("tokens / s")
    a.legend()
    a.grid(alpha=0.3)
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2el_ms", "E2E")):
        for stat, style in (("median", "-"), ("p99", ":")):
            if stat in runs[0][key]:
                b.plot(range(len(xs)), [r[key][stat] for r in runs], style, marker="o", label=f"{name} {stat}")
    b.set_xticks(range(len(xs)), labels)
    b.set_yscale("log")
    b.set_xlabel("max concurrency")
    b.set_ylabel("ms")
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict[str, Any], out_dir: str | Path, overwrite: bool = False,
                 title: str = "Serving benchmark") -> Path:
    """bench.json (everything, per-request timings included), bench.md and bench.png."""
    with atomic_directory(out_dir, overwrite) as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=1))
        (tmp / "bench.md").write_text(format_markdown(result, title))
        plot(result, tmp / "bench.png", title)
    return Path(out_dir)
