"""Shared helpers of the vLLM tests: run vLLM in a fresh interpreter, PyTorch references."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def vllm_env() -> dict[str, str]:
    """Environment for vLLM subprocesses: this checkout first on the path, a 1 GiB CPU KV cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def run_vllm_offline(request: dict[str, Any], workdir: Path, timeout: float = 900) -> dict[str, Any]:
    """``serving.vllm.offline`` in a subprocess (vLLM's engine processes stay out of pytest); a failed run
    raises RuntimeError with the tail of its stderr."""
    from serving.vllm.offline import run_offline_subprocess

    return run_offline_subprocess(request, workdir, timeout=timeout, env=vllm_env())


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation without EOS stopping, full recompute each step (no cache to trust)."""
    ids = list(prompt)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]




def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
