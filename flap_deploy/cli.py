"""The `flap-deploy` command line: parse, call a library function, print.

User mistakes surface as FlapDeployError (or a contract FlapConfigError) and are printed
as one line with a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

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


@main.group()
def export() -> None:
    """Export a checkpoint for a runtime (ONNX Runtime, vLLM)."""


@export.command("onnx")
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--opset", type=click.Choice(["20", "23"]), default="20", show_default=True,
              help="ONNX opset; 23 adds fused RMSNormalization (needs onnxruntime >= 1.22).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weight and KV-cache dtype of the graph.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="After export, store MatMul weights as int8 (ONNX Runtime dynamic quantization).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare with PyTorch on fixed prompts (prefill + 8 decode steps, batch 2, left padding); "
                   "fail if float logits are off.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads for verification.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_onnx_cmd(model, out, opset, dtype, quantize, verify, overwrite, threads, as_json) -> None:
    """Export MODEL (pruned or dense checkpoint, or `smollm2-135m`) to an ONNX Runtime directory OUT.

    OUT holds model.onnx (KV-cache decoder, contract I/O), the tokenizer files and flap_onnx.json
    (per-layer KV heads, source identity, verification figures).
    """
    import json

    from exporters.onnx.export import export_onnx
    from exporters.onnx.manifest import MANIFEST_NAME

    path = export_onnx(model, out, opset=int(opset), dtype=dtype, quantize=quantize, verify=verify,
                       overwrite=overwrite, threads=threads)
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
        return
    click.echo(f"wrote {path} ({manifest['size_bytes'] / 1e6:.1f} MB, {manifest['export_seconds']:.0f} s, "
               f"opset {manifest['opset']}, {manifest['dtype']}{', int8' if manifest['quantize'] else ''})")
    for label, v in manifest["verification"].items():
        click.echo(f"  verify {label}: max |dlogit| {v['max_abs_logit_diff']:.3g} "
                   f"({v['relative_logit_diff']:.2g} of range), greedy agreement {v['greedy_matches']}/{v['greedy_total']}")


@main.command()
@click.argument("model")
@click.argument("prompt", nargs=-1, required=True)
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k best (0 = all).")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); the text is cut before it.")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--threads", type=int, default=None, help="CPU threads.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records (runtime, tokens, text, finish reason).")
def generate(model, prompt, max_new_tokens, temperature, top_p, top_k, seed, stop, chat, threads, as_json) -> None:
    """Generate text for each PROMPT with MODEL: an ONNX export directory runs on ONNX Runtime,
    a checkpoint directory (or `smollm2-135m`) on PyTorch."""
    import json

    from exporters.generate import generate as run_generate
    from exporters.onnx.sampling import SamplingParams

    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                seed=seed, stop=tuple(stop))
    except ValueError as e:
        raise FlapDeployError(str(e)) from None
    runtime, results = run_generate(model, list(prompt), params, threads=threads, chat=chat)
    for g in results:
        if as_json:
            click.echo(json.dumps({"runtime": runtime, "prompt_tokens": len(g.prompt_ids), "token_ids": g.token_ids,
                                   "text": g.text, "finish_reason": g.finish_reason}))
        else:
            click.echo(g.text)


if __name__ == "__main__":
    main()
