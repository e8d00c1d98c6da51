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


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@main.command("compare")
@click.argument("dense", required=False)
@click.argument("pruned", required=False)
@click.option("--backend", type=click.Choice(["vllm", "onnx"]), default=None,
              help="Serving backend [default: vllm when installed, else onnx].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("compare-out"), show_default=True,
              help="Report directory (report.json, report.md, throughput.png, latency.png).")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty --out directory.")
@click.option("--concurrency", default="1,4,16", show_default=True, callback=_int_list,
              help="Comma-separated concurrency levels to sweep.")
@click.option("--num-prompts", default=32, show_default=True, help="Requests per concurrency level.")
@click.option("--input-len", default=128, show_default=True, help="Prompt tokens per request.")
@click.option("--output-len", default=64, show_default=True, help="Generated tokens per request (ignore_eos).")
@click.option("--prompts", default="self", show_default=True,
              help="Prompt source: 'self' (seeded random ordinary tokens) or a text file.")
@click.option("--repeats", default=2, show_default=True,
              help="Interleaved repeats (dense first, then pruned first, ...); medians are reported.")
@click.option("--warmup", default=2, show_default=True, help="Warm-up requests before each level.")
@click.option("--seed", default=0, show_default=True, help="Seed of the prompts and of sampling.")
@click.option("--port", default=8011, show_default=True, help="Port the servers are started on (127.0.0.1).")
@click.option("--max-model-len", default=1024, show_default=True, help="Context length given to both servers.")
@click.option("--max-num-seqs", default=16, show_default=True, help="Running-batch limit of both servers.")
@click.option("--vllm-dtype", default="float32", show_default=True,
              help="vLLM --dtype (float32 on CPU keeps results comparable; bfloat16 on GPUs).")
@click.option("--vllm-arg", "vllm_args", multiple=True, help="Extra argument for vLLM's server (repeatable).")
@click.option("--eval-text", type=click.Path(path_type=Path), default=None,
              help="Also report perplexity / KL / top-1 agreement of pruned vs dense on this text.")
@click.option("--eval-tokens", default=8192, show_default=True, help="Tokens of --eval-text to evaluate.")
@click.option("--synthetic", default=None,
              help="Build a dense + FLAP-shaped pruned pair of this architecture's shapes with random weights "
                   "(llama2-7b, llama2-13b, llama3-8b, mistral-7b, qwen2.5-7b, smollm2-135m); vLLM only.")
@click.option("--ratio", default=0.2, show_default=True, help="With --synthetic: fraction of decoder weights removed.")
@click.option("--tp-size", default=1, show_default=True, help="With --synthetic: align widths to this TP size.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def compare_command(dense: str | None, pruned: str | None, backend: str | None, out: Path, overwrite: bool,
                    concurrency: tuple[int, ...], num_prompts: int, input_len: int, output_len: int, prompts: str,
                    repeats: int, warmup: int, seed: int, port: int, max_model_len: int, max_num_seqs: int,
                    vllm_dtype: str, vllm_args: tuple[str, ...], eval_text: Path | None, eval_tokens: int,
                    synthetic: str | None, ratio: float, tp_size: int, as_json: bool) -> None:
    """Serve DENSE and PRUNED in turn on the same settings, run the same load, report the speed-up.

    The report puts the measured pruned/dense throughput beside the ideal ratio (dense ÷ pruned
    weights read per decode step) and, with --eval-text, the quality figures.
    """
    from serving.compare import CompareConfig, compare, default_backend
    from serving.compare_report import format_table

    cfg = CompareConfig(backend=backend or default_backend(), concurrency=concurrency, num_prompts=num_prompts,
                        input_len=input_len, output_len=output_len, prompts=prompts, repeats=repeats,
                        warmup=warmup, seed=seed, port=port, max_model_len=max_model_len,
                        max_num_seqs=max_num_seqs, vllm_dtype=vllm_dtype, vllm_args=vllm_args,
                        eval_text=str(eval_text) if eval_text else None, eval_tokens=eval_tokens,
                        synthetic=synthetic is not None)
    if synthetic:
        from .synthetic import cached_synthetic_pair

        if dense or pruned:
            raise FlapDeployError("--synthetic builds its own DENSE and PRUNED: give neither")
        dense, pruned = map(str, cached_synthetic_pair(synthetic, ratio, tp_size=tp_size, seed=seed))
    elif not (dense and pruned):
        raise FlapDeployError("compare needs DENSE and PRUNED models (or --synthetic NAME)")
    report = compare(dense, pruned, out, cfg, overwrite=overwrite, progress=not as_json)
    if as_json:
        _echo_json({k: v for k, v in report.items() if k != "raw"})
        return
    click.echo(format_table(report))
    click.echo(f"\nideal speed-up {report['ideal_speedup']:.3f}; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
