"""Shared helpers of the vLLM tests: run vLLM in a fresh interpreter, PyTorch references."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
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


def run_vllm_offline(request: dict[str, Any], workdir: Path, timeout: float = 600) -> dict[str, Any]:
    """``exporters.vllm.offline`` in a subprocess (vLLM's engine processes stay out of pytest)."""
    req, res = workdir / "request.json", workdir / "result.json"
    req.write_text(json.dumps(request))
    proc = subprocess.run([sys.executable, "-m", "exporters.vllm.offline", str(req), str(res)], cwd=REPO,
                          env=vllm_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM offline run failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(res.read_text())


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation without EOS stopping, full recompute each step (no cache to trust)."""
    ids = list(prompt)
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def torch_top1(model: torch.nn.Module, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Teacher-forced argmax and its log-probability at every position but the last."""
    logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)
    best = logp.max(dim=-1)
    return best.indices.tolist(), best.values.tolist()
