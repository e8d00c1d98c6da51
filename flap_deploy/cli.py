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
    from pathlib import Path

    from exporters.onnx.manifest import MANIFEST_NAME
    from flap_deploy.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=tuple(stop))
    if (Path(model) / MANIFEST_NAME).is_file():  # which runtime the directory holds
        from exporters.onnx.runtime import generate as run_generate
        runtime = "onnx"
    else:
        from flap_deploy.generate import generate as run_generate
        runtime = "pytorch"
    results = run_generate(model, list(prompt), params, threads=threads, chat=chat)
    for g in results:
        if as_json:
            click.echo(json.dumps({"runtime": runtime, "prompt_tokens": len(g.prompt_ids), "token_ids": g.token_ids,
                                   "text": g.text, "finish_reason": g.finish_reason}))
        else:
            click.echo(g.text)


def _int_list(text: str | None) -> list[int | None]:
    if not text:
        return [None]
    try:
        return [None if v.strip() in ("inf", "0") else int(v) for v in text.split(",")]
    except ValueError:
        raise FlapDeployError(f"--concurrency {text!r}: expected comma-separated integers, e.g. 1,4,16") from None


@main.command()
@click.option("--base-url", default="http://127.0.0.1:8000/v1", show_default=True,
              help="The OpenAI-compatible endpoint (ours, vLLM's, anyone's).")
@click.option("--model", default=None, help="Model id to request (default: the first of /v1/models).")
@click.option("--tokenizer", default=None,
              help="Tokenizer (directory or bundled name) for prompts and counting; default: the model root the "
                   "server reports, when it is a local directory.")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True,
              help="completions sends token-id prompts (exact input lengths); chat sends the decoded text.")
@click.option("--prompts", default="self", show_default=True,
              help="'self' (seeded random tokens) or a text FILE (seeded windows of its tokens).")
@click.option("--num-prompts", default=64, show_default=True, type=int, help="Requests per run.")
@click.option("--input-len", default=128, show_default=True, type=int, help="Prompt tokens per request.")
@click.option("--output-len", default=64, show_default=True, type=int, help="max_tokens per request.")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Ask the server to generate exactly --output-len tokens.")
@click.option("--concurrency", default=None,
              help="Comma-separated max concurrency levels, one run each (e.g. 1,4,16); default: unbounded.")
@click.option("--request-rate", default=float("inf"), type=float,
              help="Poisson arrival rate in requests/s (default inf: all at once).")
@click.option("--warmup", default=1, show_default=True, type=int,
              help="Warm-up requests per run, sent at once under the run's concurrency bound (as vllm bench serve).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of prompts and arrival times.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="Sampling temperature sent.")
@click.option("--percentiles", default="50,90,99", show_default=True, help="Latency percentiles to report.")
@click.option("--api-key", default=None, envvar="OPENAI_API_KEY", help="Bearer key (env OPENAI_API_KEY).")
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Seconds per request at most.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write bench.json, bench.md and bench.png here.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def bench(base_url: str, model: str | None, tokenizer: str | None, endpoint: str, prompts: str, num_prompts: int,
          input_len: int, output_len: int, ignore_eos: bool, concurrency: str | None, request_rate: float,
          warmup: int, seed: int, temperature: float, percentiles: str, api_key: str | None, timeout: float,
          out_dir: str | None, overwrite: bool, as_json: bool) -> None:
    """Load-test an OpenAI-compatible endpoint: throughput, TTFT, TPOT, ITL, end-to-end latency."""
    from serving.bench import build_requests, run_bench, server_tokenizer
    from serving.bench_report import format_console, summary_rows, write_report

    if out_dir:
        from .atomic import check_output_dir

        check_output_dir(out_dir, overwrite)
    try:
        pcts = [float(p) for p in percentiles.split(",")]
    except ValueError:
        raise FlapDeployError(f"--percentiles {percentiles!r}: expected numbers like 50,90,99") from None
    if request_rate <= 0:
        raise FlapDeployError(f"--request-rate must be positive, got {request_rate}")
    tok, model = server_tokenizer(base_url, tokenizer, model, api_key)
    chat = endpoint == "chat"
    reqs = build_requests(tok, prompts, num_prompts, input_len, output_len, seed=seed, chat=chat)
    result = run_bench(base_url, reqs, model=model, concurrency=_int_list(concurrency), request_rate=request_rate,
                       chat=chat, api_key=api_key, seed=seed, ignore_eos=ignore_eos, temperature=temperature,
                       warmup=warmup, timeout_s=timeout, tokenizer=tok, percentiles=pcts, progress=not as_json)
    if out_dir:
        write_report(result, out_dir, overwrite)
    if as_json:
        click.echo(json.dumps(summary_rows(result), indent=1))
    else:
        click.echo(format_console(result))
        if out_dir:
            click.echo(f"wrote {out_dir}/bench.json, bench.md, bench.png")


@main.command()
@click.argument("dense", required=False)
@click.argument("pruned", required=False)
@click.option("--backend", type=click.Choice(["onnx", "vllm"]), default=None,
              help="Server runtime for both models: vllm when vLLM is installed, else onnx.")
@click.option("--synthetic", default=None,
              help="Instead of DENSE and PRUNED: a dense and a FLAP-shaped pruned checkpoint of this architecture's "
                   "shapes with random weights (vllm --load-format dummy): llama2-7b, llama2-13b, llama3-8b, "
                   "mistral-7b, qwen2.5-7b, smollm2-135m.")
@click.option("--ratio", default=0.2, show_default=True, type=float,
              help="--synthetic: fraction of decoder linear weights the pruned shapes remove.")
@click.option("--tp-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="--synthetic: align the pruned widths to this tensor-parallel size.")
@click.option("--vllm-arg", "vllm_args", multiple=True,
              help="Extra argument for both vLLM servers (repeatable), e.g. --vllm-arg=--enforce-eager.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for report.json, report.md, throughput.png, latency.png.")
@click.option("--concurrency", default="1,4,8", show_default=True, help="Comma-separated max concurrency levels.")
@click.option("--num-prompts", default=32, show_default=True, type=int, help="Requests per level.")
@click.option("--input-len", default=128, show_default=True, type=int, help="Prompt tokens per request.")
@click.option("--output-len", default=64, show_default=True, type=int, help="Output tokens per request (ignore_eos).")
@click.option("--repeats", default=2, show_default=True, type=int,
              help="Interleaved repeats (dense, pruned, pruned, dense, ...); medians are reported.")
@click.option("--servers", type=click.Choice(["auto", "together", "in-turn"]), default="auto", show_default=True,
              help="together: start both servers first and keep them up for every repeat (one is under load "
                   "at a time; saves a start per repeat); in-turn: a fresh server per model and repeat, for "
                   "accelerators where two engines do not fit. auto: together for onnx and vllm-cpu, else in-turn.")
@click.option("--prompts", default="self", show_default=True, help="'self' or a text FILE (see bench).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the prompts.")
@click.option("--warmup", default=2, show_default=True, type=int,
              help="Warm-up requests per server and level; at least the level's concurrency, so the full batch "
                   "has run once (0: none).")
@click.option("--max-num-seqs", default=8, show_default=True, type=int, help="Server batch bound (both models).")
@click.option("--max-model-len", default=None, type=int, help="Server context length (both models).")
@click.option("--threads", default=None, type=int, help="onnx: ONNX Runtime threads.")
@click.option("--eval-text", default=None, type=click.Path(exists=True),
              help="Also report perplexity, KL and top-1 agreement on this text.")
@click.option("--eval-max-tokens", default=16384, show_default=True, type=int, help="Tokens of --eval-text to use.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the ratios as JSON.")
def compare(dense: str | None, pruned: str | None, backend: str | None, synthetic: str | None, ratio: float,
            tp_size: int, vllm_args: tuple[str, ...], out_dir: str, concurrency: str, num_prompts: int,
            input_len: int, output_len: int, repeats: int, servers: str, prompts: str, seed: int, warmup: int,
            max_num_seqs: int, max_model_len: int | None, threads: int | None, eval_text: str | None,
            eval_max_tokens: int, overwrite: bool, as_json: bool) -> None:
    """Serve DENSE and PRUNED on the same settings, run the same workload on each, report measured vs ideal."""
    from serving.compare import compare as run_compare, default_backend

    backend = backend or default_backend()
    if synthetic:
        from .synthetic import cached_synthetic_pair

        if dense or pruned:
            raise FlapDeployError("--synthetic builds its own DENSE and PRUNED: give neither")
        if backend != "vllm":
            raise FlapDeployError("--synthetic needs --backend vllm (random weights come from --load-format dummy)")
        dense, pruned = map(str, cached_synthetic_pair(synthetic, ratio, tp_size=tp_size, seed=seed))
        vllm_args = ("--load-format", "dummy", *vllm_args)
    elif not (dense and pruned):
        raise FlapDeployError("compare needs DENSE and PRUNED (or --synthetic NAME)")

    levels = [c for c in _int_list(concurrency) if c is not None]
    if not levels:
        raise FlapDeployError(f"--concurrency {concurrency!r}: give at least one positive level")
    report = run_compare(dense, pruned, backend=backend, out_dir=out_dir, concurrency=levels, vllm_args=vllm_args,
                         num_prompts=num_prompts, input_len=input_len, output_len=output_len, repeats=repeats,
                         servers=servers, prompts=prompts, seed=seed, warmup=warmup, max_num_seqs=max_num_seqs,
                         max_model_len=max_model_len, threads=threads, eval_text=eval_text,
                         eval_max_tokens=eval_max_tokens, overwrite=overwrite, progress=not as_json)
    if as_json:
        click.echo(json.dumps({"weights": report["weights"], "ratios": report["ratios"],
                                "quality": report["quality"]}, indent=1))
        return
    click.echo(f"ideal ratio (weight bytes per decode step): {report['weights']['ideal_ratio']:.3f}")
    for r in report["ratios"]:
        click.echo(f"concurrency {r['max_concurrency']}: output throughput x{r['output_throughput_ratio']:.3f}, "
                   f"TPOT x{r['tpot_ratio']:.3f}")
    click.echo(f"wrote {out_dir}/report.md, report.json, throughput.png, latency.png")


@export.command("vllm")
@click.argument("model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="Weight dtype of the exported checkpoint.")
@click.option("--tp-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel size to check the per-layer widths against (heads, KV heads, MLP widths).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def export_vllm_cmd(model: str, out: str, dtype: str, tp_size: int, overwrite: bool, as_json: bool) -> None:
    """Write MODEL as a ready-to-serve vLLM directory OUT.

    MODEL is a pruned checkpoint, a per-layer-width Llama/Mistral/Qwen2/Qwen3 checkpoint of
    another pruner (widths in config keys like layer_inter_size / layer_head_num, or only in
    the tensor shapes; converted to the flap_llama format), or `smollm2-135m`. The widths are
    checked against vLLM's rules for --tp-size before anything is written.
    """
    from exporters.vllm.export import export_vllm

    summary = export_vllm(model, out, dtype=dtype, tp_size=tp_size, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"wrote {summary['output']} ({summary['origin']}, {dtype}, {summary['parameters']:,} parameters, "
                   f"checked for --tp-size {tp_size}); serve it with: flap-deploy serve {summary['output']} "
                   f"--backend vllm --tp-size {tp_size}")


SERVE_BACKENDS = ("onnx", "vllm")


@main.command()
@click.argument("model")
@click.option("--backend", type=click.Choice(SERVE_BACKENDS), default=None,
              help="Engine behind the endpoint: vllm when vLLM is installed, else onnx (the built-in ONNX Runtime "
                   "server with continuous batching).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port of the endpoint.")
@click.option("--api-key", default=None, envvar="FLAP_DEPLOY_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (env FLAP_DEPLOY_API_KEY).")
@click.option("--served-model-name", default=None,
              help="Model id in /v1/models and requests (default: the bundled name or the directory name).")
@click.option("--max-num-seqs", default=None, type=click.IntRange(min=1),
              help="Sequences decoded together at most [onnx default: 8; vllm: its own default].")
@click.option("--max-model-len", default=None, type=click.IntRange(min=1),
              help="Context length (prompt + output tokens); default: the model's max positions.")
@click.option("--tp-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="vllm: tensor-parallel size; the checkpoint is checked against it before the engine starts.")
@click.option("--ready-timeout", type=float, default=900.0, show_default=True,
              help="vllm: seconds to wait for the engine to answer /health.")
@click.option("--max-queue", default=256, show_default=True, type=int,
              help="onnx: waiting requests at most; beyond it requests get 503.")
@click.option("--threads", default=None, type=int, help="onnx: ONNX Runtime intra-op threads (default: ORT's).")
@click.argument("backend_args", nargs=-1, type=click.UNPROCESSED)
def serve(model: str, backend: str | None, host: str, port: int, api_key: str | None, served_model_name: str | None,
          max_num_seqs: int | None, max_model_len: int | None, tp_size: int, ready_timeout: float, max_queue: int,
          threads: int | None, backend_args: tuple[str, ...]) -> None:
    """Serve MODEL on an OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics) until Ctrl-C / SIGTERM.

    MODEL: a checkpoint (pruned or dense), `smollm2-135m`, or (onnx) an ONNX export directory; the onnx
    backend exports a checkpoint once into the cache first. Arguments after `--` go to vLLM unchanged,
    e.g. `flap-deploy serve DIR --backend vllm -- --enforce-eager`.
    """
    from serving.compare import default_backend

    backend = backend or default_backend()
    if backend == "vllm":
        from serving.vllm_launcher import prepare_vllm_server, serve_vllm

        extra = [*(["--max-num-seqs", str(max_num_seqs)] if max_num_seqs else []),
                 *(["--max-model-len", str(max_model_len)] if max_model_len else []), *backend_args]
        cfg = prepare_vllm_server(model, host=host, port=port, tp_size=tp_size, api_key=api_key,
                                  extra_args=extra, served_model_name=served_model_name)

        def ready(server, seconds: float) -> None:
            click.echo(f"flap-deploy: {cfg.served_model_name} ready at {cfg.base_url}/v1 after {seconds:.1f} s "
                       "(Ctrl-C stops it)", err=True)

        sys.exit(serve_vllm(cfg, ready_timeout=ready_timeout, on_ready=ready))
    if tp_size != 1:
        raise FlapDeployError("--tp-size needs --backend vllm")
    if backend_args:
        raise FlapDeployError(f"arguments after -- are for vLLM; the onnx backend takes none ({' '.join(backend_args)})")
    from serving.server import serve_onnx

    serve_onnx(model, host=host, port=port, api_key=api_key, max_num_seqs=max_num_seqs or 8,
               max_model_len=max_model_len, max_queue=max_queue, served_model_name=served_model_name,
               threads=threads)


if __name__ == "__main__":
    main()
