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


if __name__ == "__main__":
    main()
