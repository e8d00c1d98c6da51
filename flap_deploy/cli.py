"""The `flap-deploy` command line: parse, call a library function, print.

User mistakes surface as FlapDeployError (or a contract FlapConfigError) and are printed
as one line with a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import FlapDeployError
from .modeling_flap_llama import FlapConfigError

USER_ERRORS = (FlapDeployError, FlapConfigError)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="flap-deploy")
def main() -> None:
    """flap-deploy: prune LLMs with FLAP and deploy them to PyTorch, ONNX Runtime and vLLM.

    MODEL arguments take a checkpoint directory or the bundled model name `smollm2-135m`.
    """


def _echo_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@main.command("eval")
@click.argument("model")
@click.option("--text", "text_path", required=True, type=click.Path(path_type=Path),
              help="Text file or directory of .txt files to evaluate on (WikiText is detokenized).")
@click.option("--seqlen", default=512, show_default=True, help="Tokens per evaluation window.")
@click.option("--max-tokens", type=int, default=None, help="Use only the first N tokens of the text.")
@click.option("--compare", "reference", default=None,
              help="Dense (reference) MODEL: also report mean KL(reference||model) and top-1 agreement.")
@click.option("--batch-size", default=1, show_default=True, help="Windows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
def eval_command(model: str, text_path: Path, seqlen: int, max_tokens: int | None, reference: str | None,
                 batch_size: int, as_json: bool) -> None:
    """Perplexity of MODEL on a text, optionally against a dense reference model."""
    import torch

    from .evaluate import evaluate
    from .models import load_model, load_tokenizer
    from .text import load_text

    text = load_text(text_path)
    tokenizer = load_tokenizer(model)
    result = evaluate(load_model(model, dtype=torch.float32), tokenizer, text, seqlen=seqlen,
                      max_tokens=max_tokens, batch_size=batch_size,
                      reference=load_model(reference, dtype=torch.float32) if reference else None,
                      progress=not as_json)
    if as_json:
        _echo_json({"model": model, "reference": reference, "text": str(text_path), **result.to_dict()})
        return
    click.echo(f"perplexity {result.perplexity:.3f} over {result.tokens} tokens ({result.windows} x {seqlen})")
    if reference:
        click.echo(f"reference perplexity {result.reference_perplexity:.3f}")
        click.echo(f"mean KL(reference||model) {result.kl:.4f} nats/token")
        click.echo(f"top-1 agreement {100 * result.top1_agreement:.2f} %")


@main.command()
@click.argument("model")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Where to write the widths PNG [default: MODEL_DIR/flap_widths.png].")
@click.option("--no-plot", is_flag=True, help="Do not write the PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def info(model: str, plot: Path | None, no_plot: bool, as_json: bool) -> None:
    """Per-layer widths, parameter counts and provenance of a checkpoint, and a widths plot."""
    from .info import checkpoint_report, format_report, plot_widths
    from .models import resolve_model

    path = resolve_model(model)
    report = checkpoint_report(path)
    if not no_plot:
        report["plot"] = str(plot_widths(report, plot or path / "flap_widths.png"))
    if as_json:
        _echo_json(report)
        return
    click.echo(format_report(report))
    if not no_plot:
        click.echo(f"\nplot: {report['plot']}")


@main.group()
def export() -> None:
    """Export a checkpoint for a runtime (ONNX Runtime, vLLM)."""


@main.command("prune")
@click.argument("model")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--ratio", default=0.2, show_default=True, type=float,
              help="Fraction of the decoder layers' linear weights (q/k/v/o, gate/up/down) to remove, in [0, 1).")
@click.option("--method", default="flap", show_default=True, type=click.Choice(["flap", "wanda-sp", "mag-sp"]),
              help="FLAP, or a baseline (uniform per layer, no compensation) at the same budget.")
@click.option("--metric", default="WIFV", show_default=True, type=click.Choice(["WIFV", "IFV", "WIFN"]),
              help="FLAP importance: weighted input feature variance, input feature variance, weighted input norm.")
@click.option("--structure", default="AL-AM", show_default=True,
              type=click.Choice(["AL-AM", "AL-MM", "UL-MM", "UL-UM"]),
              help="Adaptive/Uniform across Layers, Adaptive/Manual/Uniform across Modules (FLAP paper).")
@click.option("--attn-ratio", type=float, default=None,
              help="Fraction of attention weights removed by UL-MM / AL-MM [default: 0.75 x ratio].")
@click.option("--attn-granularity", default="group", show_default=True, type=click.Choice(["group", "head"]),
              help="Attention unit: a whole KV group, or query heads inside groups (equal group sizes per layer).")
@click.option("--no-bias", is_flag=True, help="Do not compensate removed channels with bias terms.")
@click.option("--calib", default="self", show_default=True,
              help="Calibration data: 'self' (model-generated, no data needed), 'hf:wikitext2' (needs `datasets` "
                   "and a network), or a text file / directory (WikiText is detokenized).")
@click.option("--nsamples", default=1024, show_default=True, type=int, help="Calibration windows.")
@click.option("--seqlen", default=128, show_default=True, type=int, help="Tokens per calibration window.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration windows / sampling.")
@click.option("--mlp-multiple", default=1, show_default=True, type=int,
              help="Keep every layer's MLP width a multiple of N (efficient GEMM shapes).")
@click.option("--tp-size", default=1, show_default=True, type=int,
              help="Keep every layer valid for vLLM tensor parallelism of size T (query heads and MLP width "
                   "divisible by T; KV heads divisible by T or dividing T).")
@click.option("--batch-size", default=8, show_default=True, type=int, help="Calibration windows per forward.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the provenance and timings as JSON.")
def prune_command(model: str, out: Path, ratio: float, method: str, metric: str, structure: str,
                  attn_ratio: float | None, attn_granularity: str, no_bias: bool, calib: str, nsamples: int,
                  seqlen: int, seed: int, mlp_multiple: int, tp_size: int, batch_size: int, overwrite: bool,
                  as_json: bool) -> None:
    """Prune MODEL with FLAP (or a baseline) and write the pruned checkpoint to OUT."""
    from .atomic import check_output_dir
    from .pruning import PruneConfig, prune

    config = PruneConfig(ratio=ratio, method=method, metric=metric, structure=structure, attn_ratio=attn_ratio,
                         attn_granularity=attn_granularity, bias=not no_bias, calib=calib, nsamples=nsamples,
                         seqlen=seqlen, seed=seed, mlp_multiple=mlp_multiple, tp_size=tp_size,
                         batch_size=batch_size, progress=not as_json)
    config.validate()
    check_output_dir(out, overwrite)  # fail before the (long) calibration
    result = prune(model, config)
    path = result.save(out, overwrite=overwrite)
    if as_json:
        _echo_json({"out": str(path), "provenance": result.provenance, "timings": result.timings})
        return
    p = result.provenance
    click.echo(f"pruned {p['source_model']} with {p['method']} ({p['structure']}): removed "
               f"{100 * p['achieved_ratio']:.2f} % of decoder linear weights (target {100 * p['target_ratio']:.1f} %), "
               f"{p['dense_params']:,} -> {p['pruned_params']:,} parameters in {result.timings['total_s']:.1f} s")
    click.echo(f"wrote {path} (per-layer report: {path / 'flap_report.txt'}, plot: {path / 'flap_widths.png'})")


if __name__ == "__main__":
    main()
