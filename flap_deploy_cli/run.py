"""`flap-deploy generate` and `flap-deploy serve`: run a model, once or as an endpoint."""

from __future__ import annotations

import sys

import click

from serving.backends import BACKENDS

from .common import CliError, FlapCommand, echo_json, json_option


@click.command(cls=FlapCommand)
@click.argument("model")
@click.argument("prompt", nargs=-1, required=True)
@click.option("--max-new-tokens", "-n", "max_tokens", type=int, default=64, show_default=True,
              help="Tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample among the k best (0 = all).")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--stop", multiple=True, help="Stop string (repeatable); the text is cut before it.")
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template.")
@click.option("--threads", type=int, default=None, help="CPU threads.")
@click.option("--device", default="auto", show_default=True,
              help="PyTorch: auto (the first CUDA device, else the CPU), cpu, cuda or cuda:N.")
@json_option
def generate(model: str, prompt: tuple[str, ...], max_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int | None, stop: tuple[str, ...], chat: bool, threads: int | None, device: str,
             as_json: bool) -> None:
    """Generate text for each PROMPT with MODEL: an ONNX export directory runs on ONNX Runtime,
    a checkpoint directory (or `smollm2-135m`) on PyTorch.

    With --json, one JSON record per prompt and line (runtime, tokens, text, finish reason)."""
    from flap_deploy.generation.sampling import SamplingParams
    from flap_deploy.io.model_ref import resolve_model

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=stop)
    ref = resolve_model(model)
    if ref.kind == "onnx":
        from exporters.onnx.runtime import generate as run_generate
    else:
        from flap_deploy.generation.generate import generate as run_generate
    runtime = "onnx" if ref.kind == "onnx" else "pytorch"
    if ref.kind == "onnx":
        results = run_generate(ref.path, list(prompt), params, threads=threads, chat=chat)
    else:
        results = run_generate(ref, list(prompt), params, threads=threads, chat=chat, device=device)
    for g in results:
        if as_json:
            echo_json({"runtime": runtime, "prompt_tokens": len(g.prompt_ids), "token_ids": g.token_ids,
                       "text": g.text, "finish_reason": g.finish_reason}, one_line=True)
        else:
            click.echo(g.text)


@click.command(cls=FlapCommand)
@click.argument("model")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Engine behind the endpoint: vllm when vLLM is installed, else onnx (the built-in ONNX Runtime "
                   "server with continuous batching).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="TCP port of the endpoint (checked free before the model loads).")
@click.option("--api-key", default=None, envvar="FLAP_DEPLOY_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/* (env FLAP_DEPLOY_API_KEY).")
@click.option("--served-model-name", default=None,
              help="Model id in /v1/models and requests (default: the bundled name or the directory name).")
@click.option("--max-num-seqs", default=None, type=click.IntRange(min=1),
              help="Sequences decoded together at most [onnx default: 8; vllm: its own default].")
@click.option("--max-model-len", default=None, type=click.IntRange(min=2),
              help="Context length (prompt + output tokens); default: the model's max positions.")
@click.option("--tp-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="vllm: tensor-parallel size; the checkpoint is checked against it before the engine starts.")
@click.option("--pp-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="vllm: pipeline-parallel size (stages of whole layers; at most the number of layers). "
                   "Combines with --tp-size: TP x PP workers.")
@click.option("--ready-timeout", type=float, default=900.0, show_default=True,
              help="vllm: seconds to wait for the engine to answer /health.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=1),
              help="onnx: waiting sequences at most; beyond it requests get 503 (400 if one request alone "
                   "asks for more).")
@click.option("--max-request-bytes", default="4M", show_default=True, metavar="SIZE",
              help="onnx: largest request body (e.g. 512K, 4M); larger ones get 413 before they are read.")
@click.option("--max-prefill-tokens", default=1024, show_default=True, type=click.IntRange(min=1),
              help="onnx: tokens per prefill graph call; longer prompts are prefilled in chunks, so a prompt's "
                   "memory is bounded by this, not by its length.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="onnx: refuse to start when the stated memory budget (weights + full KV cache + one prefill "
                   "chunk) exceeds SIZE (e.g. 8G).")
@click.option("--shutdown-timeout", "shutdown_timeout_s", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="onnx: seconds a SIGTERM waits for running requests; the rest end with an error event.")
@click.option("--header-timeout", "header_timeout_s", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="onnx: seconds a new connection may take to send its request headers.")
@click.option("--threads", default=None, type=int, help="onnx: ONNX Runtime intra-op threads (default: ORT's).")
@click.argument("backend_args", nargs=-1, type=click.UNPROCESSED)
def serve(model: str, backend: str | None, host: str, port: int, api_key: str | None, served_model_name: str | None,
          max_num_seqs: int | None, max_model_len: int | None, tp_size: int, pp_size: int, ready_timeout: float,
          max_queue: int, max_request_bytes: str, max_prefill_tokens: int, max_memory: str | None,
          shutdown_timeout_s: float, header_timeout_s: float, threads: int | None, backend_args: tuple[str, ...]) -> None:
    """Serve MODEL on an OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics) until Ctrl-C / SIGTERM.

    MODEL: a checkpoint (pruned or dense), `smollm2-135m`, or (onnx) an ONNX export directory; the onnx
    backend exports a checkpoint once into the cache first. Arguments after `--` go to vLLM unchanged,
    e.g. `flap-deploy serve DIR --backend vllm -- --enforce-eager`.
    """
    from serving.backends import default_backend

    backend = backend or default_backend()
    if backend == "vllm":
        from serving.vllm.launcher import prepare_vllm_server, serve_vllm

        cfg = prepare_vllm_server(model, host=host, port=port, tp_size=tp_size, pp_size=pp_size, api_key=api_key,
                                  max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                  extra_args=list(backend_args), served_model_name=served_model_name)
        if pp_size > 1:
            from exporters.vllm.validate import describe_split

            click.echo(f"flap-deploy: {pp_size} pipeline stages: {describe_split(cfg.pp_split)}", err=True)

        def ready(server, seconds: float) -> None:
            click.echo(f"flap-deploy: {cfg.served_model_name} ready at {cfg.base_url}/v1 after {seconds:.1f} s "
                       "(Ctrl-C stops it)", err=True)

        sys.exit(serve_vllm(cfg, ready_timeout=ready_timeout, on_ready=ready))
    if tp_size != 1 or pp_size != 1:
        raise CliError(f"{'--tp-size' if tp_size != 1 else '--pp-size'} needs --backend vllm")
    if backend_args:
        raise CliError(f"arguments after -- are for vLLM; the onnx backend takes none ({' '.join(backend_args)})")
    from serving.onnx.app import serve_onnx
    from serving.onnx.settings import OnnxServerSettings

    settings = OnnxServerSettings(
        model=model, host=host, port=port, api_key=api_key, served_model_name=served_model_name,
        max_num_seqs=max_num_seqs or 8, max_model_len=max_model_len, max_queue=max_queue,
        max_request_bytes=max_request_bytes, max_prefill_tokens=max_prefill_tokens, max_memory=max_memory,
        shutdown_timeout_s=shutdown_timeout_s, header_timeout_s=header_timeout_s, threads=threads)
    sys.exit(serve_onnx(settings))
