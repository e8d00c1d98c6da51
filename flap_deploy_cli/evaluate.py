"""`flap-deploy info` and `flap-deploy eval`: what a checkpoint is, and how good it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from serving.measure.tasks import TASK_BACKENDS, task_comparison

from .common import (
    CliError,
    FlapCommand,
    at_revision,
    echo_json,
    json_option,
    revision_option,
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


class ModeOption(click.Option):
    """An `eval` option of one mode (``--text`` or ``--tasks``): its help says the mode, and given in the
    other mode it is refused (`eval` checks every ModeOption, so a new one needs no second entry)."""

    def __init__(self, *args: Any, mode: str, **kw: Any):
        kw["help"] = f"{mode}: {kw['help']}"
        super().__init__(*args, **kw)
        self.mode = mode


def _check_modes(ctx: click.Context, mode: str) -> None:
    for p in ctx.command.params:
        if (isinstance(p, ModeOption) and p.mode != mode
                and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE):
            raise CliError(f"{p.opts[0]} applies to {p.mode}, not {mode}")


@click.command("eval", cls=FlapCommand)
@click.argument("model")
@revision_option
@click.option("--text", "text_path", type=click.Path(path_type=Path),
              help="Perplexity on a text file or directory of .txt files (WikiText is detokenized).")
@click.option("--tasks", default=None,
              help="Task accuracy through lm-evaluation-harness: comma-separated lm-eval task names, 'paper' "
                   "(the FLAP paper's seven tasks; datasets from the Hugging Face Hub), 'offline' (tasks built "
                   "here from WikiText-2) or paths to lm-eval task YAMLs with local data files.")
@click.option("--seqlen", cls=ModeOption, mode="--text", default=512, show_default=True,
              help="tokens per evaluation window.")
@click.option("--max-tokens", cls=ModeOption, mode="--text", type=int, default=None,
              help="use only the first N tokens of the text.")
@click.option("--compare", "reference", default=None,
              help="Dense (reference) MODEL: with --text also report mean KL(reference||model) and top-1 "
                   "agreement; with --tasks evaluate it too, side by side.")
@click.option("--batch-size", type=int, default=None,
              help="--text: windows per forward pass [default: 1]; --tasks: requests per batch on the hf "
                   "backend [default: 16].")
@click.option("--limit", cls=ModeOption, mode="--tasks", type=int, default=None,
              help="only the first N items of each task.")
@click.option("--backend", cls=ModeOption, mode="--tasks", type=click.Choice(tuple(TASK_BACKENDS)), default="hf",
              show_default=True, help="lm-eval's backend (" + "; ".join(
                  f"{b.name}: {b.summary}" for b in TASK_BACKENDS.values()) + ").")
@click.option("--device", cls=ModeOption, mode="--text", default="auto", show_default=True,
              help="where layers run: auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N. "
                   "Layers are read one at a time, so a checkpoint larger than memory evaluates too.")
@click.option("--dtype", default=None, type=click.Choice(COMPUTE_DTYPES),
              help="Compute dtype [default --text: the checkpoint's on an accelerator, float32 on the CPU; "
                   "--tasks: float32].")
@click.option("--task-text", cls=ModeOption, mode="--tasks", type=click.Path(path_type=Path), default=None,
              help="offline tasks: the text they are built from [default: WikiText-2 test in "
                   "../shared/data, or $FLAP_DEPLOY_TASK_TEXT].")
@click.option("--plot", cls=ModeOption, mode="--tasks", type=click.Path(path_type=Path), default=None,
              help="with --compare, where to write the PNG [default: MODEL_DIR/flap_tasks.png; none for a Hub id].")
@click.option("--no-plot", cls=ModeOption, mode="--tasks", is_flag=True,
              help="with --compare, do not write the PNG.")
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
    _check_modes(ctx, "--text" if text_path is not None else "--tasks")
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
