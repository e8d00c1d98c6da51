"""Zero-shot task accuracy of the bundled SmolLM2-135M, dense vs pruned by `flap-deploy prune` with the
shipped defaults, through lm-evaluation-harness on each backend (HF/PyTorch and vLLM), and how far the
backends agree.

The tasks: the offline set (WikiText-2 cloze and sentence endings, 500 items each, built from
../shared/data at run time) by default; `--tasks paper` where the Hugging Face Hub is reachable.
The pruned model: benchmarks/flap_model.py (the shipped defaults through the CLI); its exact recipe is
written into the results.

    python benchmarks/tasks.py [--tasks offline] [--limit N] [--backends hf,vllm] [--out benchmarks/results]

Writes tasks.md, tasks.json and tasks_<backend>.png into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from flap_model import flap_pruned_bundled, recipe  # noqa: E402

from flap_deploy.evaluation.task_report import format_table  # noqa: E402
from flap_deploy.io.bundled import materialize  # noqa: E402
from serving.measure.tasks import task_comparison  # noqa: E402


def backend_agreement(a: dict, b: dict) -> dict:
    """Per task: share of items with the same chosen answer, and the largest log-likelihood gap."""
    out = {}
    for task, x in a["tasks"].items():
        y = b["tasks"][task]
        same = [p == q for p, q in zip(x["predictions"], y["predictions"])]
        gap = max(abs(u - v) for lx, ly in zip(x["loglikelihoods"], y["loglikelihoods"]) for u, v in zip(lx, ly))
        out[task] = {"same_predictions": sum(same) / len(same), "max_abs_loglikelihood_diff": gap}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="offline")
    parser.add_argument("--limit", type=int, default=None, help="items per task [default: all]")
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    dense = materialize("smollm2-135m")
    pruned = flap_pruned_bundled()
    args.out.mkdir(parents=True, exist_ok=True)
    runs, times = {}, {}
    for backend in args.backends.split(","):
        t = time.perf_counter()
        runs[backend] = task_comparison(str(pruned), args.tasks, reference=str(dense), limit=args.limit,
                                        backend=backend, dtype=args.dtype, plot=args.out / f"tasks_{backend}.png",
                                        quiet=True)
        times[backend] = time.perf_counter() - t
        print(f"{backend}: {times[backend]:.0f} s", file=sys.stderr)

    agreement = {}
    if "hf" in runs and "vllm" in runs:
        agreement = {role: backend_agreement(runs["hf"][role], runs["vllm"][role]) for role in ("reference", "model")}
    summary = {"tasks": args.tasks, "limit": args.limit, "dtype": args.dtype, "dense": str(dense),
               "pruned": str(pruned), "pruned_recipe": recipe(pruned), "runs": runs, "backend_agreement": agreement, "seconds": times,
               "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    (args.out / "tasks.json").write_text(json.dumps(summary, indent=1))
    lines = ["# Task accuracy: dense vs the shipped default FLAP-20 %, lm-evaluation-harness", "",
             f"Dense: the bundled SmolLM2-135M-Instruct. Pruned (`{pruned.name}`): `flap-deploy prune smollm2-135m OUT` "
             f"with no flags, i.e. {recipe(pruned)}.", "",
             f"`python benchmarks/tasks.py --tasks {args.tasks}"
             + (f" --limit {args.limit}" if args.limit else "") + f" --backends {args.backends}`, {args.dtype}.", ""]
    for backend, report in runs.items():
        lines += [f"## {backend} backend ({times[backend]:.0f} s)", "", "```",
                  format_table(report["model"], report["reference"], report["chance"]), "```", "",
                  f"![{backend}](tasks_{backend}.png)", ""]
    if agreement:
        lines += ["## HF vs vLLM backend", "", "| model | task | same answer | max abs log-likelihood diff |",
                  "|---|---|---|---|"]
        for role, per_task in agreement.items():
            for task, a in per_task.items():
                lines.append(f"| {role} | {task} | {100 * a['same_predictions']:.1f} % | "
                             f"{a['max_abs_loglikelihood_diff']:.2e} |")
    (args.out / "tasks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
