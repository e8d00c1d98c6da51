"""Server settings (validated once, carried as JSON) and the backend table the CLI, compare and soak start servers from."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy_cli import main
from flap_deploy_cli.demo import main as demo_main
from serving.backends import BACKENDS, get_backend, resolve_server_mode
from serving.onnx.settings import OnnxServerSettings
from serving.settings import API_KEY_ENV, run_entry_point
from serving.vllm.settings import VllmServerSettings


def test_settings_survive_their_json_round_trip():
    onnx = OnnxServerSettings(model="m", port=8123, api_key="k", max_num_seqs=3, max_request_bytes="512K",
                              max_memory="2G", threads=2, shutdown_timeout_s=1.5)
    assert onnx.max_request_bytes == 512 << 10 and onnx.max_memory == 2 << 30  # sizes held in bytes
    assert OnnxServerSettings.from_json(onnx.to_json()) == onnx
    vllm = VllmServerSettings(model="m", tp_size=2, extra_args=["--enforce-eager", "--dtype", "float32"])
    assert vllm.extra_args == ("--enforce-eager", "--dtype", "float32")
    assert VllmServerSettings.from_json(vllm.to_json()) == vllm


@pytest.mark.parametrize("cls, field, value", [
    (OnnxServerSettings, "port", 0), (OnnxServerSettings, "port", 65536), (OnnxServerSettings, "port", "80"),
    (OnnxServerSettings, "max_num_seqs", 0), (OnnxServerSettings, "max_model_len", 1),
    (OnnxServerSettings, "max_queue", 0), (OnnxServerSettings, "max_prefill_tokens", 0),
    (OnnxServerSettings, "max_request_bytes", "lots"), (OnnxServerSettings, "max_memory", "0"),
    (OnnxServerSettings, "threads", 0), (OnnxServerSettings, "body_timeout_s", 0),
    (OnnxServerSettings, "header_timeout_s", -1), (OnnxServerSettings, "shutdown_timeout_s", -1),
    (OnnxServerSettings, "log_level", "loud"), (OnnxServerSettings, "host", ""),
    (VllmServerSettings, "tp_size", 0), (VllmServerSettings, "pp_size", 1.5),
    (VllmServerSettings, "ready_timeout_s", 0), (VllmServerSettings, "extra_args", [1]),
])
def test_a_bad_setting_is_a_parameter_error_naming_it(cls, field, value):
    with pytest.raises(ParameterError) as e:
        cls(model="m", **{field: value})
    assert e.value.param == field and "\n" not in str(e.value)


def test_json_with_an_unknown_key_or_without_a_model_is_refused_by_name():
    with pytest.raises(ParameterError, match="^colour is not a setting of OnnxServerSettings"):
        OnnxServerSettings.from_json(json.dumps({"model": "m", "colour": "red"}))
    with pytest.raises(ParameterError, match="^model is required"):
        VllmServerSettings.from_json("{}")
    with pytest.raises(FlapDeployError, match="not valid JSON"):
        OnnxServerSettings.from_json("{model")


def test_a_setting_of_another_backend_is_refused_naming_the_backend_that_takes_it():
    with pytest.raises(ParameterError, match="^threads is a setting of the onnx backend, not of vllm"):
        BACKENDS["vllm"].settings_for("m", threads=2)
    with pytest.raises(ParameterError, match="^extra_args is a setting of the vllm backend, not of onnx"):
        BACKENDS["onnx"].settings_for("m", extra_args=("--enforce-eager",))
    # unset options (None, no pass-through arguments) take the backend's defaults
    assert BACKENDS["onnx"].settings_for("m", threads=None, extra_args=()) == OnnxServerSettings(model="m")
    with pytest.raises(ParameterError, match="^backend 'tpu'"):
        get_backend("tpu")
    with pytest.raises(ParameterError, match="^servers 'both'"):
        resolve_server_mode("both", "onnx")


def test_the_api_key_travels_in_the_environment_not_on_the_command_line(monkeypatch):
    settings = OnnxServerSettings(model="m", api_key="sk-secret")
    server = BACKENDS["onnx"].process(settings)
    assert server.command[1:3] == ["-m", "serving.onnx"]
    assert not any("sk-secret" in a for a in server.command)
    assert server.env[API_KEY_ENV] == "sk-secret"
    seen = []
    monkeypatch.setenv(API_KEY_ENV, "sk-secret")
    assert run_entry_point("serving.onnx", OnnxServerSettings, lambda s: seen.append(s) or 0, [server.command[3]]) == 0
    assert seen == [settings]


def test_the_entry_point_refuses_bad_settings_in_one_line(capsys):
    assert run_entry_point("serving.onnx", OnnxServerSettings, lambda s: 0, ['{"model": "m", "port": 0}']) == 2
    assert capsys.readouterr().err == "error: port must be between 1 and 65535, got 0\n"
    assert run_entry_point("serving.vllm", VllmServerSettings, lambda s: 0, ["/no/such/settings.json"]) == 2
    assert capsys.readouterr().err.startswith("error: /no/such/settings.json: cannot read the server settings")


def test_every_backend_choice_of_the_cli_comes_from_the_table():
    for command in (main.commands["serve"], main.commands["compare"], demo_main):
        option = next(p for p in command.params if p.name == "backend")
        assert tuple(option.type.choices) == tuple(BACKENDS)


@pytest.mark.parametrize("args, message", [
    (["--backend", "vllm", "--threads", "2"], "error: --threads is a setting of the onnx backend, not of vllm"),
    (["--backend", "onnx", "--tp-size", "2"], "error: --tp-size is a setting of the vllm backend, not of onnx"),
    (["--backend", "onnx", "--max-queue", "0"], "error: --max-queue must be at least 1, got 0"),
    (["--backend", "onnx", "--", "--enforce-eager"],
     "error: arguments after -- go to the engine; the onnx backend takes none (--enforce-eager)"),
])
def test_serve_refuses_settings_before_it_looks_at_the_model(args, message, tmp_path):
    r = CliRunner().invoke(main, ["serve", str(tmp_path / "no-such-model"), *args])
    assert r.exit_code == 2 and r.output == message + "\n"
