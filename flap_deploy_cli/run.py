"""`flap-deploy generate` and `flap-deploy serve`: run a model, once or as an endpoint."""

from __future__ import annotations

import dataclasses
import sys

import click

from serving.backends import BACKENDS
from serving.settings import API_KEY_ENV

from .common import (
    CliError,
    FlapCommand,
    at_revision,
    echo_json,
    json_option,
    revision_option,
)


@click.command(cls=FlapCommand)
@click.argument("model")
@click.argument("prompt", nargs=-1, required=True)
@revision_option
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
def generate(model: str, prompt: tuple[str, ...], revision: str | None, max_tokens: int, temperature: float, top_p: float, top_k: int,
             seed: int | None, stop: tuple[str, ...], chat: bool, threads: int | None, device: str,
             as_json: bool) -> None:
    """Generate text for each PROMPT with MODEL: an ONNX export directory runs on ONNX Runtime,
    a checkpoint directory (or `smollm2-135m`) on PyTorch.

    With --json, one JSON record per prompt and line (runtime, tokens, text, finish reason)."""
    from flap_deploy.generation.sampling import SamplingParams
    from flap_deploy.io.model_ref import resolve_model

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                            stop=stop)
    ref = resolve_model(model, revision=revision)
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


def _setting(flag: str, name: str, help: str, **kw):
    """A `serve` option that is the backend setting ``name``: given options only reach the backend (a backend
    that lacks the setting refuses it by name), so its help names the backends that take it and their default."""
    takers = [b for b in BACKENDS.values() if name in b.options]
    defaults = {b.name: next(f.default for f in dataclasses.fields(b.settings) if f.name == name) for b in takers}
    shown = {k: _shown(v, kw.get("metavar")) for k, v in defaults.items() if v not in (None, ())}
    if len(takers) < len(BACKENDS):
        lead = help[0] if help[1:2].isupper() else help[0].lower()  # an acronym keeps its case
        help = f"{' / '.join(defaults)}: {lead}{help[1:]}"
    if len(set(shown.values())) == 1 and len(shown) == len(takers):
        help += f"  [default: {next(iter(shown.values()))}]"
    elif shown:
        help += f"  [default: {'; '.join(f'{k} {v}' for k, v in shown.items())}; otherwise the engine's own]"
    return click.option(flag, name, default=None, help=help, **kw)


def _shown(value: object, metavar: str | None) -> str:
    if metavar == "SIZE" and isinstance(value, int) and value % (1 << 20) == 0:
        return f"{value >> 20}M"
    return str(value)


@click.command(cls=FlapCommand)
@click.argument("model")
@revision_option
@click.option("--backend", type=click.Choice(tuple(BACKENDS)), default=None,
              help="Engine behind the endpoint: " + "; ".join(f"{b.name}: {b.summary}" for b in BACKENDS.values())
                   + ". Default: the first installed of " + ", ".join(BACKENDS) + ".")
@_setting("--host", "host", "Address to bind (0.0.0.0 exposes it).")
@_setting("--port", "port", "TCP port of the endpoint (checked free before the model loads).", type=int)
@click.option("--api-key", default=None, envvar=API_KEY_ENV,
              help=f"Require 'Authorization: Bearer KEY' on /v1/* (env {API_KEY_ENV}).")
@_setting("--served-model-name", "served_model_name",
          "Model id in /v1/models and requests (default: the bundled name or the directory name).")
@_setting("--max-num-seqs", "max_num_seqs", "Sequences decoded together at most.", type=int)
@_setting("--max-model-len", "max_model_len",
          "Context length (prompt + output tokens); default: the model's max positions.", type=int)
@_setting("--tp-size", "tp_size", "Tensor-parallel size; the checkpoint is checked against it before the engine "
                                  "starts.", type=int)
@_setting("--pp-size", "pp_size", "Pipeline-parallel size (stages of whole layers; at most the number of layers). "
                                  "Combines with --tp-size: TP x PP workers.", type=int)
@_setting("--ready-timeout", "ready_timeout_s", "Seconds to wait for the engine to answer /health.", type=float)
@_setting("--max-queue", "max_queue", "Waiting sequences at most; beyond it requests get 503 (400 if one request "
                                      "alone asks for more).", type=int)
@_setting("--max-request-bytes", "max_request_bytes", "Largest request body (e.g. 512K, 4M); larger ones get 413 "
                                                      "before they are read.", metavar="SIZE")
@_setting("--max-prefill-tokens", "max_prefill_tokens",
          "Tokens per prefill graph call; longer prompts are prefilled in chunks, so a prompt's memory is bounded "
          "by this, not by its length.", type=int)
@_setting("--max-memory", "max_memory", "Refuse to start when the stated memory budget (weights + full KV cache + "
                                        "one prefill chunk) exceeds SIZE (e.g. 8G).", metavar="SIZE")
@_setting("--shutdown-timeout", "shutdown_timeout_s",
          "Seconds a SIGTERM waits for running requests; the rest end with an error event.", type=float)
@_setting("--header-timeout", "header_timeout_s",
          "Seconds a new connection may take to send its request headers.", type=float)
@_setting("--threads", "threads", "ONNX Runtime intra-op threads (default: ORT's).", type=int)
@click.argument("extra_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- ENGINE_ARGS...]")
def serve(model: str, revision: str | None, backend: str | None, extra_args: tuple[str, ...], **options: object
          ) -> None:
    """Serve MODEL on an OpenAI-compatible endpoint (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics) until Ctrl-C / SIGTERM.

    MODEL: a checkpoint (pruned or dense), `smollm2-135m`, or (onnx) an ONNX export directory; the onnx
    backend exports a checkpoint once into the cache first. Arguments after `--` go to the engine unchanged
    (vllm), e.g. `flap-deploy serve DIR --backend vllm -- --enforce-eager`.
    """
    from serving.backends import get_backend

    b = get_backend(backend)
    if extra_args and "extra_args" not in b.options:
        raise CliError(f"arguments after -- go to the engine; the {b.name} backend takes none ({' '.join(extra_args)})")
    if revision is not None:  # the Hub id's snapshot at that revision, served under the id's name
        (ref,) = at_revision(revision, model)
        model, options["served_model_name"] = str(ref.path), options.get("served_model_name") or ref.name
    sys.exit(b.serve(b.settings_for(model, extra_args=extra_args, **options)))
