"""`make demo`: the whole product on the bundled model, with no data and no network.

materialize SmolLM2-135M → prune with the shipped defaults (FLAP 20 %, ls reconstruction,
self-generated calibration) but fewer calibration windows → dense agreement on self-generated
text → task accuracy, dense vs pruned (lm-eval on the offline WikiText-2 tasks) → ONNX and
vLLM exports → `compare` on the best installed backend → the table and the report path, each
figure under the exact recipe of the pruned model. Under CI=true the workload is smaller;
``--quick --backend onnx`` is the quick path the tests run (no vLLM engine is started; the vLLM
path is covered by the vLLM tests).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click

from serving.backends import BACKENDS

from .common import FlapCommand

BUNDLED = "smollm2-135m"


def _step(title: str) -> float:
    click.secho(f"\n==> {title}", bold=True, err=True)
    return time.perf_counter()


def run_demo(out: str | os.PathLike = "demo-out", *, quick: bool = False, backend: str | None = None) -> dict[str, Any]:
    """Run every stage into ``out`` (replaced); return the summary that is also written as demo.json."""
    import torch

    from exporters.onnx import export_onnx
    from exporters.vllm.export import export_vllm
    from flap_deploy.evaluation.perplexity import evaluate_windows
    from flap_deploy.io.bundled import materialize
    from flap_deploy.io.model_ref import resolve_model
    from flap_deploy.pruning.calibration import self_generated
    from flap_deploy.pruning.config import PruneConfig
    from flap_deploy.pruning.pipeline import prune
    from flap_deploy.pruning.recipes import describe_recipe
    from serving.backends import default_backend
    from serving.measure.compare import compare
    from serving.measure.compare_report import format_markdown

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    times: dict[str, float] = {}
    torch.set_num_threads(os.cpu_count() or 1)

    t = _step(f"materialize the bundled {BUNDLED}")
    dense_dir = materialize(BUNDLED)
    times["materialize_s"] = time.perf_counter() - t

    # the shipped defaults but fewer calibration windows than 1024, so that the demo stays minutes
    config = PruneConfig(nsamples=32 if quick else 128)
    t = _step(f"prune {100 * config.ratio:g} % with the shipped defaults but {config.nsamples} calibration windows "
              f"({config.calib}: no data needed)")
    ref = resolve_model(dense_dir)
    dense = ref.load(torch.float32)
    tokenizer = ref.tokenizer()
    pruned = prune(dense, config, tokenizer=tokenizer, out=out / "pruned", overwrite=True)
    pruned_dir = pruned.path
    pruned_config = json.loads((pruned_dir / "config.json").read_text())
    recipe = describe_recipe(pruned_config)
    times["prune_s"] = time.perf_counter() - t
    click.echo(f"pruned checkpoint: {pruned_dir}: {recipe}", err=True)

    t = _step("agreement with the dense model on self-generated text")
    windows = self_generated(dense, tokenizer, nsamples=4 if quick else 8, seqlen=256, seed=1234)
    quality = evaluate_windows(pruned.model, windows, reference=dense).to_dict()
    times["eval_s"] = time.perf_counter() - t
    del dense, pruned

    t = _step("task accuracy, dense vs pruned (lm-evaluation-harness, offline WikiText-2 tasks)")
    tasks = _task_step(dense_dir, pruned_dir, out, limit=25 if quick else 200)
    times["tasks_s"] = time.perf_counter() - t

    t = _step("export ONNX (verified against PyTorch)")
    onnx_dir = export_onnx(pruned_dir, out / "onnx-pruned", overwrite=True)
    times["export_onnx_s"] = time.perf_counter() - t

    t = _step("export vLLM directory")
    vllm_dir = Path(export_vllm(pruned_dir, out / "vllm-pruned", dtype="float32", overwrite=True)["output"])
    times["export_vllm_s"] = time.perf_counter() - t
    exports = {"onnx": onnx_dir, "vllm": vllm_dir}  # what each backend serves

    backend = backend or default_backend()
    t = _step(f"compare dense vs pruned on {backend}")
    report = compare(str(dense_dir), str(exports[backend]), backend=backend, out_dir=out / "compare",
                     concurrency=(1, 4) if quick else (1, 4, 16), num_prompts=8 if quick else 16,
                     workload="fixed:128,32" if quick else "fixed:128,64", repeats=1 if quick else 2, warmup=1 if quick else 2,
                     max_num_seqs=16, max_model_len=512, overwrite=True)
    times["compare_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - start
    ideal = report["weights"]["ideal_ratio"]

    summary = {
        "dense": str(dense_dir), "pruned": str(pruned_dir), "onnx": str(onnx_dir), "vllm": str(vllm_dir),
        "recipe": recipe, "achieved_ratio": pruned_config["flap"]["achieved_ratio"],
        "quality_self_text": quality, "tasks": tasks, "backend": backend, "ideal_speedup": ideal,
        "speedup": {str(r["max_concurrency"]): r["output_throughput_ratio"] for r in report["ratios"]},
        "report": str(out / "compare" / "report.md"), "times": times, "quick": quick,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    click.secho("\n==> result", bold=True)
    click.echo(f"pruned model: {recipe}")
    click.echo(f"quality vs dense (self-generated text, {quality['tokens']} tokens): "
               f"top-1 agreement {100 * quality['top1_agreement']:.1f} %, KL {quality['kl']:.3f}, "
               f"perplexity {quality['reference_perplexity']:.2f} -> {quality['perplexity']:.2f}")
    if tasks:
        click.echo(f"task accuracy (lm-eval, {tasks['limit']} items per task; plot {tasks['plot']}):")
        click.echo(tasks["table"])
    click.echo(format_markdown(report))
    click.echo(f"ideal speed-up {ideal:.3f}; report: {summary['report']}; "
               f"demo took {times['total_s'] / 60:.1f} min")
    return summary


def _task_step(dense_dir: Path, pruned_dir: Path, out: Path, limit: int) -> dict[str, Any] | None:
    """Dense vs pruned on the offline task set through lm-eval's HF backend (None, with a note,
    where the WikiText-2 text the tasks are built from is not on this machine)."""
    from flap_deploy.evaluation.task_report import format_table
    from flap_deploy.evaluation.tasks import default_task_text
    from serving.measure.tasks import task_comparison

    if not default_task_text().is_file():
        click.echo(f"skipped: {default_task_text()} is not here (set FLAP_DEPLOY_TASK_TEXT)", err=True)
        return None
    report = task_comparison(str(pruned_dir), "offline", reference=str(dense_dir), limit=limit,
                             plot=out / "tasks.png", quiet=True)
    return {"limit": limit, "plot": report["plot"], "comparison": report["comparison"],
            "table": format_table(report["model"], report["reference"], report["chance"])}


@click.command(cls=FlapCommand)
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path),
              help="Working directory of the demo (replaced).")
@click.option("--quick/--full", default=None,
              help="Smaller workload: 32 calibration windows instead of 128, fewer evaluation windows and task "
                   "items, one compare repeat of 8 prompts x 32 output tokens at concurrency 1 and 4 [default: quick when "
                   "CI=true].")
@click.option("--backend", type=click.Choice(tuple(BACKENDS)), default=None,
              help="Serving backend for compare [default: vllm when installed, else onnx]. onnx starts no vLLM "
                   "engine (vllm starts two, one per model): --quick --backend onnx is the quick path the tests run.")
def main(out: Path, quick: bool | None, backend: str | None) -> None:
    """The end-to-end demo on the bundled model (what `make demo` runs): prune with the shipped defaults but
    fewer calibration windows, evaluate, export to ONNX and vLLM, compare dense vs pruned serving."""
    if quick is None:
        quick = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    run_demo(out, quick=quick, backend=backend)


if __name__ == "__main__":
    main()
