"""`flap-deploy info` and `flap-deploy eval`: what a checkpoint is, and how good it is."""

from __future__ import annotations

from pathlib import Path

import click

from .common import FlapCommand, echo_json, json_option
from .prune import DTYPES as COMPUTE_DTYPES


@click.command(cls=FlapCommand)
@click.argument("model")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Where to write the widths PNG [default: MODEL_DIR/flap_widths.png].")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG.")
@json_option
def info(model: str, plot: Path | None, no_plot: bool, as_json: bool) -> None:
    """Per-layer widths, parameter counts and provenance of a checkpoint, and a widths plot."""
    from flap_deploy.info import checkpoint_report, format_report, plot_widths
    from flap_deploy.model_ref import CHECKPOINTS, resolve_model

    ref = resolve_model(model, accept=CHECKPOINTS)
    report = checkpoint_report(ref)
    if not no_plot:
        report["plot"] = str(plot_widths(report, plot or ref.path / "flap_widths.png"))
    if as_json:
        echo_json(report)
        return
    click.echo(format_report(report))
    if not no_plot:
        click.echo(f"\nplot: {report['plot']}")


@click.command("eval", cls=FlapCommand)
@click.argument("model")
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path),
              help="Text file or directory of .txt files to evaluate on (WikiText is detokenized).")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-tokens", type=int, default=None, help="Use only the first N tokens of the text.")
@click.option("--compare", "reference", default=None,
              help="Dense (reference) MODEL: also report mean KL(reference||model) and top-1 agreement.")
@click.option("--batch-size", default=1, show_default=True, help="Windows per forward pass.")
@click.option("--device", default="auto", show_default=True,
              help="Where layers run: auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N. Layers are "
                   "read one at a time, so a checkpoint larger than memory evaluates too.")
@click.option("--dtype", default=None, type=click.Choice(COMPUTE_DTYPES),
              help="Compute dtype [default: the checkpoint's on an accelerator, float32 on the CPU].")
@json_option
def eval_command(model: str, text_path: Path, seqlen: int, max_tokens: int | None, reference: str | None,
                 batch_size: int, device: str, dtype: str | None, as_json: bool) -> None:
    """Perplexity of MODEL on a text, optionally against a dense reference model."""
    from flap_deploy.evaluate import evaluate
    from flap_deploy.model_ref import CHECKPOINTS, resolve_model
    from flap_deploy.streaming import resolve_device
    from flap_deploy.text import load_text

    resolve_device(device)  # a missing accelerator is an error before any reading
    text = load_text(text_path)
    ref = resolve_model(model, accept=CHECKPOINTS)
    dense = resolve_model(reference, accept=CHECKPOINTS) if reference else None
    result = evaluate(ref, ref.tokenizer(), text, seqlen=seqlen, max_tokens=max_tokens, batch_size=batch_size,
                      reference=dense, progress=not as_json, device=device, dtype=dtype)
    if as_json:
        echo_json({"model": model, "reference": reference, "text": str(text_path), **result.to_dict()})
        return
    click.echo(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens ({result.windows} x {seqlen})")
    if reference:
        click.echo(f"reference perplexity {result.reference_perplexity:.3f}")
        click.echo(f"mean KL(reference||model) {result.kl:.4f} nats/token")
        click.echo(f"top-1 agreement {100 * result.top1_agreement:.2f} %")
