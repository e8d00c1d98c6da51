"""`flap-deploy info` and `flap-deploy eval`: what a checkpoint is, and how good it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import (
    CliError,
    FlapCommand,
    at_revision,
    echo_json,
    json_option,
    revision_option,
    stdout_to_stderr,
)
from .prune import DTYPES as COMPUTE_DTYPES


@click.command(cls=FlapCommand)
@click.argument("model")
@revision_option
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Where to write the widths PNG [default: MODEL_DIR/flap_widths.png; none for a Hub id, whose "
                   "snapshot in the Hugging Face cache is left as fetched].")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG.")
@json_option
def info(model: str, revision: str | None, plot: Path | None, no_plot: bool, as_json: bool) -> None:
    """Per-layer widths, parameter counts and provenance of a checkpoint, and a widths plot."""
    from flap_deploy.io.info import checkpoint_report, format_report, plot_widths
    from flap_deploy.io.model_ref import CHECKPOINTS, resolve_model

    ref = resolve_model(model, accept=CHECKPOINTS, revision=revision)
    report = checkpoint_report(ref)
    plot = plot or (None if ref.revision else ref.path / "flap_widths.png")
    no_plot = no_plot or plot is None
    if not no_plot:
        report["plot"] = str(plot_widths(report, plot))
    if as_json:
        echo_json(report)
        return
    click.echo(format_report(report))
    if not no_plot:
        click.echo(f"\nplot: {report['plot']}")


@click.command("eval", cls=FlapCommand)
@click.argument("model")
@revision_option
@click.option("--text", "text_path", type=click.Path(path_type=Path),
              help="Perplexity on a text file or directory of .txt files (WikiText is detokenized).")
@click.option("--tasks", default=None,
              help="Task accuracy through lm-evaluation-harness: comma-separated lm-eval task names, 'paper' "
                   "(the FLAP paper's seven tasks; datasets from the Hugging Face Hub), 'offline' (tasks built "
                   "here from WikiText-2) or paths to lm-eval task YAMLs with local data files.")
@click.option("--seqlen", default=512, show_default=True, help="--text: tokens per evaluation window.")
@click.option("--max-tokens", type=int, default=None, help="--text: use only the first N tokens of the text.")
@click.option("--compare", "reference", default=None,
              help="Dense (reference) MODEL: with --text also report mean KL(reference||model) and top-1 "
                   "agreement; with --tasks evaluate it too, side by side.")
@click.option("--batch-size", type=int, default=None,
              help="--text: windows per forward pass [default: 1]; --tasks: requests per batch on the hf "
                   "backend [default: 16].")
@click.option("--limit", type=int, default=None, help="--tasks: only the first N items of each task.")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="--tasks: lm-eval's backend (hf: PyTorch through transformers; vllm: a vLLM engine).")
@click.option("--device", default="auto", show_default=True,
              help="--text: where layers run: auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N. "
                   "Layers are read one at a time, so a checkpoint larger than memory evaluates too.")
@click.option("--dtype", default=None, type=click.Choice(COMPUTE_DTYPES),
              help="Compute dtype [default --text: the checkpoint's on an accelerator, float32 on the CPU; "
                   "--tasks: float32].")
@click.option("--task-text", type=click.Path(path_type=Path), default=None,
              help="--tasks offline: the text the tasks are built from [default: WikiText-2 test in "
                   "../shared/data, or $FLAP_DEPLOY_TASK_TEXT].")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="--tasks with --compare: where to write the PNG [default: MODEL_DIR/flap_tasks.png; none for a "
                   "Hub id].")
@click.option("--no-plot", is_flag=True, help="--tasks with --compare: do not write the PNG.")
@click.option("--card", is_flag=True,
              help="Add the measured results to MODEL's model card (README.md, Hub metadata): MODEL must be a local "
                   "pruned checkpoint (one made before cards existed gets its card first). A result measured "
                   "again with the same settings replaces the earlier one.")
@json_option
@click.pass_context
def eval_command(ctx: click.Context, model: str, revision: str | None, text_path: Path | None, tasks: str | None,
                 seqlen: int, max_tokens: int | None, reference: str | None, batch_size: int | None,
                 limit: int | None, backend: str, device: str, dtype: str | None, task_text: Path | None,
                 plot: Path | None, no_plot: bool, card: bool, as_json: bool) -> None:
    """Perplexity of MODEL on a text (--text), or its accuracy on lm-eval tasks (--tasks);
    optionally against a dense reference model (--compare)."""
    if (text_path is None) == (tasks is None):
        raise CliError("give one of --text (perplexity) or --tasks (task accuracy)")
    explicit = [p.opts[0] for p in ctx.command.params if isinstance(p, click.Option)
                and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE]
    only = {"--text": ("--seqlen", "--max-tokens", "--device"),
            "--tasks": ("--limit", "--backend", "--task-text", "--plot", "--no-plot")}
    mode = "--text" if text_path is not None else "--tasks"
    for other, flags in only.items():
        for flag in flags:
            if other != mode and flag in explicit:
                raise CliError(f"{flag} applies to {other}, not {mode}")
    from flap_deploy.io.model_ref import CHECKPOINTS

    model, reference = at_revision(revision, model, reference, accept=CHECKPOINTS)
    if card:  # where the results go is checked before they are measured
        from flap_deploy.io.card import card_problem
        from flap_deploy.io.model_ref import resolve_model

        model = resolve_model(model, accept=CHECKPOINTS)
        if problem := card_problem(model):
            raise CliError(f"--card: {problem}")
    if tasks is not None:
        from flap_deploy.evaluation.task_report import format_table

        report = task_comparison(model, tasks, reference=reference, limit=limit, backend=backend,
                                 dtype=dtype or "float32",
                                 batch_size=batch_size or 16, task_text=task_text,
                                 plot=None if no_plot else plot or True, quiet=as_json)
        if card:
            report["card"] = _add_to_card(model, "tasks", {
                "settings": {"tasks": tasks, "limit": limit, "backend": backend,
                             "reference": reference and str(reference)},
                "results": _task_scores(report)})
        if as_json:
            echo_json(report)
            return
        click.echo(format_table(report["model"], report["reference"], report["chance"]))
        if report["plot"]:
            click.echo(f"\nplot: {report['plot']}")
        if card:
            click.echo(f"added to the model card {report['card']}")
        return

    from flap_deploy.evaluation.perplexity import evaluate
    from flap_deploy.io.model_ref import resolve_model
    from flap_deploy.io.text import load_text
    from flap_deploy.streaming.layers import resolve_device

    resolve_device(device)  # a missing accelerator is an error before any reading
    text = load_text(text_path)
    ref = resolve_model(model, accept=CHECKPOINTS)
    dense = resolve_model(reference, accept=CHECKPOINTS) if reference else None
    result = evaluate(ref, ref.tokenizer(), text, seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size or 1,
                      reference=dense, progress=not as_json, device=device, dtype=dtype)
    written = _add_to_card(ref, "perplexity", {
        "settings": {"text": str(text_path), "seqlen": seqlen, "max_tokens": max_tokens,
                     "reference": reference and str(reference)},
        **{k: v for k, v in result.to_dict().items() if k != "seqlen"}}) if card else None
    if as_json:
        echo_json({"model": str(model), "reference": reference and str(reference), "text": str(text_path),
                   **result.to_dict(), **({"card": written} if card else {})})
        return
    click.echo(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens ({result.windows} x {seqlen})")
    if reference:
        click.echo(f"reference perplexity {result.reference_perplexity:.3f}")
        click.echo(f"mean KL(reference||model) {result.kl:.4f} nats/token")
        click.echo(f"top-1 agreement {100 * result.top1_agreement:.2f} %")
    if written:
        click.echo(f"added to the model card {written}")


def _add_to_card(ref: Any, kind: str, record: dict[str, Any]) -> str:
    from flap_deploy.io.card import add_result

    return str(add_result(ref, kind, record))


def _task_scores(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per task and metric: the model's score, the reference's (when there was one) and the items scored."""
    reference = (report["reference"] or {}).get("tasks", {})
    rows = []
    for task, result in report["model"]["tasks"].items():
        for metric, value in result["metrics"].items():
            ref = reference.get(task, {}).get("metrics", {}).get(metric)
            rows.append({"task": task, "metric": metric, "score": value["value"], "items": result["n"],
                         "reference_score": ref and ref["value"]})
    return rows


def task_comparison(model: str, tasks: str, *, reference: str | None = None, limit: int | None = None,
                    backend: str = "hf", dtype: str = "float32", batch_size: int = 16,
                    task_text: Path | None = None, plot: Path | bool | None = True,
                    quiet: bool = False) -> dict[str, Any]:
    """`eval --tasks` (and the demo's task step): check everything first (limit, tasks and their
    data, models), then run lm-eval on the reference and the model; return both results, the
    chance levels, the comparison rows and the plot path (``plot=True``: MODEL_DIR/flap_tasks.png).
    ``quiet``: progress and engine logs go to stderr, stdout stays clean for JSON."""
    from flap_deploy.evaluation.task_report import compare_results, plot_comparison
    from flap_deploy.evaluation.tasks import (
        check_limit,
        load_tasks,
        run_tasks,
        select_tasks,
    )
    from flap_deploy.io.model_ref import CHECKPOINTS, resolve_model

    check_limit(limit)
    selection = select_tasks(tasks, task_text=task_text)
    ref = resolve_model(model, accept=CHECKPOINTS)
    dense = resolve_model(reference, accept=CHECKPOINTS) if reference else None
    if backend == "vllm":
        from serving.vllm.launcher import check_servable, check_vllm_installed

        check_vllm_installed()
        for r in (dense, ref):
            if r is not None:
                check_servable(r)
    loaded = load_tasks(selection)

    def run(r):
        with stdout_to_stderr(quiet):
            if backend == "vllm":
                from serving.vllm.tasks import run_tasks_vllm

                return run_tasks_vllm(r, loaded, limit=limit, dtype=dtype, progress=not quiet)
            return run_tasks(r, loaded, limit=limit, batch_size=batch_size, dtype=dtype, progress=not quiet)

    dense_result = run(dense) if dense else None
    result = run(ref)
    plot_path = None
    if plot is True:  # beside the model, unless it is a Hub snapshot (left as fetched)
        plot = None if ref.revision else ref.path / "flap_tasks.png"
    if dense_result and plot:
        plot_path = plot_comparison(result, dense_result, plot, selection.chance)
    return {"model": result, "reference": dense_result, "chance": selection.chance,
            "comparison": compare_results(dense_result, result) if dense_result else None,
            "plot": str(plot_path) if plot_path else None}
