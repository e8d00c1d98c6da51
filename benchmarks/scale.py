"""Pruning at increasing model sizes: time and peak memory of the layer-streaming pruner.

Random-weight Llama checkpoints (float32, written locally; speed and memory depend on shapes,
not values) of about 0.5B, 1B, 2B and 4B parameters. For each, in separate processes:

* one streamed dense forward over the calibration set (``layerwise.final_hidden``): the unit
  prune time is measured in;
* ``flap-deploy prune --ratio 0.2`` (FLAP, text calibration) with the shipped default reconstruction
  (``ls``) and with ``--reconstruct bias``, each without ``--max-memory`` and with it at 40 % of the
  checkpoint: wall time, the plan's expected peak and the process's own peak RSS (VmHWM of a fresh
  process);
* optionally the whole-model baseline (the dense model loaded whole, then pruned in memory),
  where it fits in memory.

Writes benchmarks/results/scale.{md,json,png}. Run alone on a quiet machine:

    PYTHONPATH=. python benchmarks/scale.py --sizes 0.5B,1B,2B,4B --baseline 0.5B,1B
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flap_deploy.pruning.config import PruneConfig  # noqa: E402
from flap_deploy.pruning.synthetic import Shape  # noqa: E402

SIZES = {
    "0.5B": Shape("LlamaForCausalLM", 1024, 4096, 24, 16, 4, 64),
    "1B": Shape("LlamaForCausalLM", 2048, 8192, 16, 32, 8, 64),
    "2B": Shape("LlamaForCausalLM", 2048, 8192, 32, 32, 8, 64),
    "4B": Shape("LlamaForCausalLM", 3072, 8192, 36, 24, 8, 128),
}
GIB = 1024**3

# One process per figure, so each peak RSS is that of one job. Prints a JSON line.
FORWARD = """
import json, sys, time, torch
from flap_deploy.streaming.memory import peak_rss_bytes
from flap_deploy.pruning.calibration import text_windows
from flap_deploy.streaming.passes import final_hidden
from flap_deploy.io.model_ref import resolve_model
from flap_deploy.streaming.layers import LayerStream
torch.set_num_threads({threads})
ref = resolve_model(sys.argv[1])
ids = text_windows(sys.argv[2], ref.tokenizer(), {nsamples}, {seqlen}, 0)
stream = LayerStream.open(ref, device="cpu")
t = time.perf_counter()
final_hidden(stream, ids, batch_size=8)
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes()}}))
"""
BASELINE = """
import json, sys, time, torch
from flap_deploy.streaming.memory import peak_rss_bytes
from flap_deploy.io.model_ref import load_model
from flap_deploy.pruning.pipeline import PruneConfig, prune
torch.set_num_threads({threads})
t = time.perf_counter()
model = load_model(sys.argv[1], dtype=torch.float32)
prune(model, PruneConfig(ratio=0.2, calib=sys.argv[2], nsamples={nsamples}, seqlen={seqlen}, reconstruct=sys.argv[4],
                         progress=False), out=sys.argv[3])
print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss": peak_rss_bytes()}}))
"""


class Refused(Exception):
    """The command said no in one line (exit 2): a limit below what the plan needs."""


def run_json(cmd: list[str], env: dict[str, str]) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: "):
        raise Refused(res.stderr.strip().splitlines()[-1])
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{res.stderr[-3000:]}")
    out = res.stdout.strip()
    try:
        return json.loads(out)  # the CLI's --json document
    except json.JSONDecodeError:
        return json.loads(out.splitlines()[-1])  # a probe's one-line figure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5B,1B,2B,4B", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--baseline", default="0.5B,1B", help="sizes also pruned by the whole-model baseline")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--calib", default=str(REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/flap-scale"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reconstructs", default=f"{PruneConfig().reconstruct},bias",
                    help="reconstruction modes, comma-separated (default: the shipped default, then bias)")
    ap.add_argument("--limit-share", type=float, default=0.4,
                    help="--max-memory of the limited runs, as a share of the checkpoint (default 0.4)")
    args = ap.parse_args()

    from flap_deploy.io.bundled import materialize
    from flap_deploy.io.shards import ShardedReader
    from flap_deploy.pruning.synthetic import write_random_checkpoint

    env = dict(os.environ, PYTHONPATH=str(REPO))
    tok = materialize("smollm2-135m")
    rows = []
    for name in args.sizes.split(","):
        shape = SIZES[name]
        src = args.work / f"dense-{name}"
        if not (src / "config.json").is_file():
            write_random_checkpoint(src, shape, tokenizer_from=tok, overwrite=True)
        size = ShardedReader(src).nbytes
        params = size // 4
        fwd = run_json([sys.executable, "-c", FORWARD.format(threads=args.threads, nsamples=args.nsamples,
                                                              seqlen=args.seqlen), str(src), args.calib], env)
        out = args.work / f"pruned-{name}"
        row = {"size": name, "params": params, "checkpoint_bytes": size, "layers": shape.num_hidden_layers,
               "forward_s": fwd["seconds"], "forward_peak_rss": fwd["peak_rss"], "runs": []}
        for mode in args.reconstructs.split(","):
            for limit in (None, int(args.limit_share * size)):
                shutil.rmtree(out, ignore_errors=True)
                t = time.perf_counter()
                try:
                    pr = run_json([sys.executable, "-m", "flap_deploy_cli", "prune", str(src), str(out), "--ratio",
                                   "0.2", "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen",
                                   str(args.seqlen), "--device", "cpu", "--reconstruct", mode, "--json",
                                   *(["--max-memory", str(limit)] if limit else [])], env)
                except Refused as e:  # refused before any layer ran: the figure it names is the row
                    row["runs"].append({"reconstruct": mode, "max_memory": limit, "refused": str(e),
                                        "prune_s": time.perf_counter() - t})
                    print(json.dumps(row["runs"][-1]), flush=True)
                    continue
                plan = pr["memory"]["plan"]
                row["runs"].append({"reconstruct": mode, "max_memory": limit, "prune_s": time.perf_counter() - t,
                                    "prune_internal_s": pr["timings"]["total_s"],
                                    "peak_rss": pr["memory"]["peak_rss_bytes"], "planned": plan["host_peak_bytes"],
                                    "ls_statistics": plan.get("ls_statistics", ""), "plan": plan})
                print(json.dumps({k: v for k, v in row["runs"][-1].items() if k != "plan"}), flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if name in args.baseline.split(","):
            base_out = args.work / f"baseline-{name}"
            shutil.rmtree(base_out, ignore_errors=True)
            b = run_json([sys.executable, "-c", BASELINE.format(threads=args.threads, nsamples=args.nsamples,
                                                                 seqlen=args.seqlen), str(src), args.calib,
                          str(base_out), args.reconstructs.split(",")[0]], env)
            shutil.rmtree(base_out, ignore_errors=True)
            row.update(baseline_s=b["seconds"], baseline_peak_rss=b["peak_rss"])
        rows.append(row)
        shutil.rmtree(src, ignore_errors=True)
    write(args.out, {"nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads,
                     "limit_share": args.limit_share,
                     "calib": args.calib, "load_average": os.getloadavg(), "rows": rows})


def _need(error: str) -> str:
    """The figure a refusal names ("the run needs about X GiB of host memory")."""
    match = re.search(r"needs about ([\d.]+ GiB)", error)
    return f"needs {match.group(1)}" if match else error


def write(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Pruning at scale (layer streaming)", "",
        f"Random-weight Llama checkpoints, float32, FLAP 20 %, text calibration ({Path(data['calib']).name}, "
        f"{data['nsamples']} x {data['seqlen']} tokens), CPU ({data['threads']} threads), load average at the end "
        f"{data['load_average'][0]:.2f}. Each prune is `flap-deploy prune SRC OUT --ratio 0.2 --calib FILE "
        f"--nsamples {data['nsamples']} --seqlen {data['seqlen']} --device cpu --reconstruct MODE "
        f"[--max-memory {data['limit_share']:.0%} of the checkpoint]` in a fresh process; peak RSS is that "
        "process's VmHWM, the plan its printed expected peak. Command: `PYTHONPATH=. python benchmarks/scale.py`.", "",
        "| size | params | checkpoint | layers | forward s | reconstruct | --max-memory | ls covariances | prune s | "
        "prune ÷ forward | plan | peak RSS | plan ÷ peak | peak ÷ limit | RSS ÷ checkpoint |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        for run in r["runs"]:
            limit = run["max_memory"]
            if "refused" in run:
                lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f} B | {r['checkpoint_bytes'] / GIB:.2f} GiB | "
                             f"{r['layers']} | {r['forward_s']:.1f} | {run['reconstruct']} | {limit / GIB:.2f} GiB | "
                             f"refused before any layer ran: {_need(run['refused'])} | | | | | | | |")
                continue
            lines.append(
                f"| {r['size']} | {r['params'] / 1e9:.2f} B | {r['checkpoint_bytes'] / GIB:.2f} GiB | {r['layers']} | "
                f"{r['forward_s']:.1f} | {run['reconstruct']} | {f'{limit / GIB:.2f} GiB' if limit else '—'} | "
                f"{run['ls_statistics'] or '—'} | {run['prune_s']:.1f} | {run['prune_s'] / r['forward_s']:.2f} | "
                f"{run['planned'] / GIB:.2f} GiB | {run['peak_rss'] / GIB:.2f} GiB | {run['planned'] / run['peak_rss']:.3f} | "
                + (f"{run['peak_rss'] / limit:.3f} | " if limit else "— | ") +
                f"{run['peak_rss'] / r['checkpoint_bytes']:.3f} |")
    base = [r for r in data["rows"] if "baseline_peak_rss" in r]
    if base:
        lines += ["", "Whole-model baseline (the dense model loaded whole, then pruned in memory): "
                  + "; ".join(f"{r['size']}: peak RSS {r['baseline_peak_rss'] / GIB:.2f} GiB "
                              f"({r['baseline_peak_rss'] / r['checkpoint_bytes']:.2f} × the checkpoint)" for r in base)]
    lines += ["", "prune s is the whole `flap-deploy prune` process (start-up, plan, calibration, scoring, writing); "
              "forward s is one streamed dense forward over the same windows, in its own process. "
              "ls covariances: where the shipped refit's statistics came from (a second pass, flat in depth, "
              "or kept from the statistics pass when the limit has room for them)."]
    (out / "scale.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    x = [r["checkpoint_bytes"] / GIB for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, x, ":", color="#999999", label="checkpoint size")
    for j, run in enumerate(rows[0]["runs"]):
        label = f"{run['reconstruct']}, " + (f"--max-memory {data['limit_share']:.0%}" if run["max_memory"] else "no limit")
        done = [(xi, r["runs"][j]) for xi, r in zip(x, rows) if "peak_rss" in r["runs"][j]]
        if not done:
            continue
        line, = ax.plot([d[0] for d in done], [d[1]["peak_rss"] / GIB for d in done], "o-", label=f"peak RSS, {label}")
        ax.plot([d[0] for d in done], [d[1]["planned"] / GIB for d in done], "x:", color=line.get_color(),
                label=f"plan, {label}")
    ax.plot(x, [data["limit_share"] * v for v in x], "--", color="#cc0000", label=f"{data['limit_share']:.0%} of the checkpoint")
    base = [(r["checkpoint_bytes"] / GIB, r["baseline_peak_rss"] / GIB) for r in rows if "baseline_peak_rss" in r]
    if base:
        ax.plot(*zip(*base), "s--", label="whole-model baseline, peak RSS")
    ax.set_xlabel("checkpoint size (GiB, float32)")
    ax.set_ylabel("peak resident memory (GiB)")
    ax.set_title("FLAP pruning memory vs model size: plan and peak")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
