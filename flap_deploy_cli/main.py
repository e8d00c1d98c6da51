"""The `flap-deploy` group, its commands added in the order of the flow."""

from __future__ import annotations

import click

from . import evaluate, export, heal, measure, prune, run
from .common import FlapGroup


@click.group(cls=FlapGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="flap-deploy")
def main() -> None:
    """flap-deploy: prune LLMs with FLAP and deploy them to PyTorch, ONNX Runtime and vLLM.

    MODEL arguments take a checkpoint directory or the bundled model name `smollm2-135m`.
    The commands are listed in the order of the flow: prune, heal, inspect, evaluate, export, run, measure.
    """


for _command in (prune.prune, heal.heal, evaluate.info, evaluate.eval_command, export.export, export.quantize,
                 run.generate, run.serve, measure.bench, measure.compare):
    main.add_command(_command)
