"""The CLI starts fast (no torch for --help or usage errors) and agrees with the library it fronts."""

import dataclasses
import json
import subprocess
import sys

import click

from flap_deploy_cli import main

# Runs the CLI in a fresh interpreter, then reports which heavy modules it imported.
PROBE = """
import json, sys
from flap_deploy_cli import main
try:
    main(sys.argv[1:], prog_name="flap-deploy")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in ("torch", "transformers", "onnxruntime", "vllm")
                                                if m in sys.modules)}), file=sys.stderr)
"""


def probe(*args):
    res = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True)
    return res, json.loads(res.stderr.strip().splitlines()[-1])


def all_command_paths(group=main, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from all_command_paths(command, (*prefix, name))


def test_help_of_every_command_imports_no_torch():
    for path in [(), *all_command_paths()]:
        res, report = probe(*path, "--help")
        assert report == {"code": 0, "heavy": []}, (path, report)
        assert "Usage:" in res.stdout


def test_usage_errors_import_no_torch():
    for args in (["prune"], ["prune", "m", "o", "--method", "nope"], ["serve", "m", "--backend", "tpu"],
                 ["nonsense"]):
        res, report = probe(*args)
        assert report["code"] == 2 and report["heavy"] == [], (args, report)


def test_commands_are_listed_in_flow_order():
    assert list(main.commands) == ["prune", "heal", "info", "eval", "export", "quantize", "generate", "serve",
                                  "bench", "compare"]


def _option(command, name):
    return next(p for p in command.params if p.name == name)


def test_prune_options_are_the_prune_config_fields_with_its_defaults_and_choices():
    from flap_deploy.pruning.config import PruneConfig, choices

    command = main.commands["prune"]
    fields = {f.name: f.default for f in dataclasses.fields(PruneConfig) if f.name != "progress"}
    options = {p.name: p.default for p in command.params if p.name not in ("model", "out", "revision", "overwrite", "as_json",
                                                                            "no_bias")}
    assert options == fields
    for name, vocabulary in choices().items():
        assert tuple(_option(command, name).type.choices) == tuple(v for v in vocabulary if v is not None), name


def test_heal_options_are_the_heal_config_fields_with_its_defaults():
    from flap_deploy.heal.config import DTYPES, HealConfig

    command = main.commands["heal"]
    fields = {f.name: f.default for f in dataclasses.fields(HealConfig) if f.name != "progress"}
    options = {p.name: p.default for p in command.params
               if p.name not in ("pruned", "out", "overwrite", "as_json", "state_dir", "resume", "keep_state")}
    assert options == fields
    assert tuple(_option(command, "dtype").type.choices) == DTYPES


def test_a_bad_prune_value_is_refused_without_torch():
    res, report = probe("prune", "smollm2-135m", "/nonexistent/out", "--ratio", "2")
    assert report == {"code": 2, "heavy": []}, report
    assert res.stderr.splitlines()[0] == "error: --ratio must be in [0, 1), got 2.0"


def test_export_choices_are_the_exporters():
    from exporters.onnx.manifest import DTYPES as ONNX_DTYPES
    from exporters.vllm.export import DTYPES as VLLM_DTYPES

    export = main.commands["export"]
    assert tuple(_option(export.commands["onnx"], "dtype").type.choices) == tuple(ONNX_DTYPES)
    assert tuple(_option(export.commands["vllm"], "dtype").type.choices) == tuple(VLLM_DTYPES)
    from exporters.vllm.quantize import SCHEMES

    assert tuple(_option(main.commands["quantize"], "scheme").type.choices) == tuple(SCHEMES)


def test_synthetic_choices_are_the_synthetic_shapes():
    from flap_deploy.pruning.synthetic import SHAPES
    from flap_deploy_cli.measure import SYNTHETIC_SHAPES

    assert tuple(_option(main.commands["compare"], "synthetic").type.choices) == tuple(SHAPES) == SYNTHETIC_SHAPES



def test_every_command_with_a_model_argument_takes_the_one_revision_flag():
    from flap_deploy_cli.common import revision_option

    declared = click.command()(revision_option(lambda revision: None)).params[0]
    with_model = {path for path in all_command_paths() if _command(path).params and any(
        isinstance(p, click.Argument) and p.name in ("model", "dense") for p in _command(path).params)}
    assert with_model == {("prune",), ("info",), ("eval",), ("export", "onnx"), ("export", "vllm"), ("export", "hf"),
                          ("quantize",), ("generate",), ("serve",), ("compare",)}
    for path in with_model:
        option = _option(_command(path), "revision")
        assert (option.opts, option.help, option.default) == (declared.opts, declared.help, declared.default), path


def _command(path):
    command = main
    for name in path:
        command = command.commands[name]
    return command
