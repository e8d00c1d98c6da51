"""The `flap-deploy` command line: parse, call a library function, print.

User mistakes surface as FlapDeployError (or a contract FlapConfigError) and are printed
as one line with a non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
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


SERVE_BACKENDS = ("vllm",)


@main.command()
@click.argument("model")
@click.option("--backend", type=click.Choice(SERVE_BACKENDS), default="vllm", show_default=True,
              help="Inference engine behind the OpenAI-compatible endpoint.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 exposes it).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port of the endpoint.")
@click.option("--tp-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Tensor-parallel size (vLLM); the checkpoint is checked against it before the engine starts.")
@click.option("--api-key", default=None, help="Require this bearer token on every request.")
@click.option("--served-model-name", default=None,
              help="Model name in /v1/models and requests (default: the bundled name or the directory name).")
@click.option("--ready-timeout", type=float, default=900.0, show_default=True,
              help="Seconds to wait for the engine to answer /health.")
@click.argument("backend_args", nargs=-1, type=click.UNPROCESSED)
def serve(model: str, backend: str, host: str, port: int, tp_size: int, api_key: str | None,
          served_model_name: str | None, ready_timeout: float, backend_args: tuple[str, ...]) -> None:
    """Serve MODEL on an OpenAI-compatible endpoint until Ctrl-C / SIGTERM.

    Arguments after `--` go to the backend unchanged, e.g.
    `flap-deploy serve DIR --backend vllm -- --max-model-len 2048`.
    """
    if backend == "vllm":
        from serving.vllm_launcher import prepare_vllm_server, serve_vllm

        cfg = prepare_vllm_server(model, host=host, port=port, tp_size=tp_size, api_key=api_key,
                                  extra_args=list(backend_args), served_model_name=served_model_name)

        def ready(server, seconds: float) -> None:
            click.echo(f"flap-deploy: {cfg.served_model_name} ready at {cfg.base_url}/v1 after {seconds:.1f} s "
                       "(Ctrl-C stops it)", err=True)

        sys.exit(serve_vllm(cfg, ready_timeout=ready_timeout, on_ready=ready))


if __name__ == "__main__":
    main()
