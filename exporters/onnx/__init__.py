"""ONNX export of FlapLlama models and ONNX Runtime generation.

``export_onnx(model, out_dir, ...)`` writes ``model.onnx`` (contract I/O, see
ARCHITECTURE.md), the tokenizer files and ``flap_onnx.json``; ``OnnxCausalLM.from_dir``
loads such a directory and runs ``forward`` / ``generate`` with the KV cache kept as
ORT values. Imports are lazy so that ``import exporters.onnx`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_onnx", "ensure_onnx", "OnnxCausalLM", "Generation", "MANIFEST_NAME"]


def __getattr__(name: str) -> Any:
    if name in ("export_onnx", "ensure_onnx"):
        from . import export

        return getattr(export, name)
    if name in ("OnnxCausalLM", "Generation"):
        from . import runtime

        return getattr(runtime, name)
    if name == "MANIFEST_NAME":
        from .manifest import MANIFEST_NAME

        return MANIFEST_NAME
    raise AttributeError(name)
