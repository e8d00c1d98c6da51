"""Pruning at increasing model sizes: time and peak memory of the layer-streaming pruner.

Random-weight Llama checkpoints (float32, written locally; speed and memory depend on shapes,
not values) of about 0.5B, 1B, 2B and 4B parameters. For each, in separate processes:

* one streamed dense forward over the calibration set (``layerwise.final_hidden``): the unit
  prune time is measured in;
* ``flap-deploy prune --ratio 0.2`` (FLAP, text calibration): wall time and peak RSS;
* optionally the whole-model baseline (the dense model loaded whole, then pruned in memory),
  where it fits in memory.

Writes benchmarks/results/scale.{md,json,png}. Run alone on a quiet machine:

    PYTHONPATH=. python benchmarks/scale.py --sizes 0.5B,1B,2B,4B --baseline 0.5B,1B
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flap_deploy.pruning.methods import RECONSTRUCTIONS  # noqa: E402
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


def run_json(cmd: list[str], env: dict[str, str]) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
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
    ap.add_argument("--reconstruct", default="bias", choices=tuple(RECONSTRUCTIONS),
                    help="bias (the paper's) measures the streaming itself; ls adds one layer's input covariance "
                         "(float64, n x kept) and a second forward while writing")
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
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        pr = run_json([sys.executable, "-m", "flap_deploy_cli", "prune", str(src), str(out), "--ratio", "0.2",
                       "--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                       "--device", "cpu", "--reconstruct", args.reconstruct, "--json"], env)
        prune_s = time.perf_counter() - t
        row = {"size": name, "params": params, "checkpoint_bytes": size, "layers": shape.num_hidden_layers,
               "forward_s": fwd["seconds"], "forward_peak_rss": fwd["peak_rss"], "prune_s": prune_s,
               "prune_internal_s": pr["timings"]["total_s"], "prune_peak_rss": pr["memory"]["peak_rss_bytes"],
               "plan": pr["memory"]["plan"]}
        shutil.rmtree(out, ignore_errors=True)
        if name in args.baseline.split(","):
            base_out = args.work / f"baseline-{name}"
            shutil.rmtree(base_out, ignore_errors=True)
            b = run_json([sys.executable, "-c", BASELINE.format(threads=args.threads, nsamples=args.nsamples,
                                                                 seqlen=args.seqlen), str(src), args.calib,
                          str(base_out), args.reconstruct], env)
            shutil.rmtree(base_out, ignore_errors=True)
            row.update(baseline_s=b["seconds"], baseline_peak_rss=b["peak_rss"])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
        shutil.rmtree(src, ignore_errors=True)
    write(args.out, {"nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads,
                     "reconstruct": args.reconstruct,
                     "calib": args.calib, "load_average": os.getloadavg(), "rows": rows})


def write(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "# Pruning at scale (layer streaming)", "",
        f"Random-weight Llama checkpoints, float32, FLAP 20 % (`--reconstruct {data['reconstruct']}`), "
        f"{data['nsamples']} x {data['seqlen']} calibration tokens, "
        f"CPU ({data['threads']} threads), load average at the end {data['load_average'][0]:.2f}. "
        "Command: `PYTHONPATH=. python benchmarks/scale.py`.", "",
        "| size | params | checkpoint | forward s | prune s | prune ÷ forward | peak RSS | RSS ÷ checkpoint | "
        "whole-model baseline RSS ÷ checkpoint |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        base = f"{r['baseline_peak_rss'] / r['checkpoint_bytes']:.2f}" if "baseline_peak_rss" in r else "—"
        lines.append(f"| {r['size']} | {r['params'] / 1e9:.2f} B | {r['checkpoint_bytes'] / GIB:.2f} GiB | "
                     f"{r['forward_s']:.1f} | {r['prune_s']:.1f} | {r['prune_s'] / r['forward_s']:.2f} | "
                     f"{r['prune_peak_rss'] / GIB:.2f} GiB | {r['prune_peak_rss'] / r['checkpoint_bytes']:.3f} | {base} |")
    lines += ["", "prune s is the whole `flap-deploy prune` process (start-up, plan, calibration, scoring, writing); "
              "forward s is one streamed dense forward over the same windows, in its own process."]
    (out / "scale.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    x = [r["checkpoint_bytes"] / GIB for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, x, ":", color="#999999", label="checkpoint size")
    ax.plot(x, [r["prune_peak_rss"] / GIB for r in rows], "o-", label="streamed prune, peak RSS")
    base = [(r["checkpoint_bytes"] / GIB, r["baseline_peak_rss"] / GIB) for r in rows if "baseline_peak_rss" in r]
    if base:
        ax.plot(*zip(*base), "s--", label="whole-model baseline, peak RSS")
    ax.set_xlabel("checkpoint size (GiB, float32)")
    ax.set_ylabel("peak resident memory (GiB)")
    ax.set_title("FLAP pruning memory vs model size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
