"""Shared helpers of the vLLM tests: run vLLM in a fresh interpreter, PyTorch references."""

from __future__ import annotations

import importlib.util
import os
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
    """``exporters.vllm.offline`` in a subprocess (vLLM's engine processes stay out of pytest)."""
    from exporters.vllm.offline import run_offline_subprocess

    try:
        return run_offline_subprocess(request, workdir, timeout=timeout, env=vllm_env())
    except RuntimeError as e:
        raise AssertionError(str(e)) from None


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


@torch.no_grad()
def prune_bundled_fixed(dense_dir: Path, out: Path, texts: list[str], keep_mlp: int = 1184) -> Path:
    """A ~20 %-pruned SmolLM2-135M, aligned for tensor-parallel size 2, with compensation biases.

    A stand-in for the FLAP pruner: every layer drops one of its 3 KV groups (9/3 -> 6/2
    heads; which one rotates with the layer) and keeps the ``keep_mlp`` MLP channels of
    largest fluctuation (variance of the down_proj input x squared column norm) on
    ``texts``; calibration means of the o_proj / down_proj inputs give the biases.
    """
    from flap_deploy.adapters import get_adapter
    from flap_deploy.checkpoint import save_checkpoint
    from flap_deploy.compress import LayerMask, LayerMeans, compress
    from flap_deploy.models import load_model, load_tokenizer

    model = load_model(dense_dir, dtype=torch.float32)
    tok = load_tokenizer(dense_dir)
    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)
    sums: dict[tuple[int, str], torch.Tensor] = {}
    sq: dict[tuple[int, str], torch.Tensor] = {}
    count = [0] * geom.num_layers
    hooks = []
    for i in range(geom.num_layers):
        mods = adapter.layer_modules(model, i)
        for kind, mod in (("attn", mods.o_proj), ("mlp", mods.down_proj)):
            def hook(_m, args, _i=i, _k=kind):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[(_i, _k)] = sums.get((_i, _k), 0) + x.sum(0)
                sq[(_i, _k)] = sq.get((_i, _k), 0) + (x * x).sum(0)
                if _k == "attn":
                    count[_i] += x.shape[0]
            hooks.append(mod.register_forward_pre_hook(hook))
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids[:, :256]
        model(ids)
    for h in hooks:
        h.remove()
    masks, means = [], []
    for i in range(geom.num_layers):
        n = count[i]
        mean_a, mean_m = sums[(i, "attn")] / n, sums[(i, "mlp")] / n
        var_m = sq[(i, "mlp")] / n - mean_m**2
        down = adapter.layer_modules(model, i).down_proj.weight.double()
        score = var_m * down.pow(2).sum(0)
        mlp = torch.zeros(geom.intermediate_size, dtype=torch.bool)
        mlp[score.topk(keep_mlp).indices] = True
        heads = torch.ones(geom.num_heads, dtype=torch.bool)
        drop = i % geom.num_kv_heads
        heads[drop * geom.group_size:(drop + 1) * geom.group_size] = False
        masks.append(LayerMask(heads=heads, mlp=mlp))
        means.append(LayerMeans(attn=mean_a.float(), mlp=mean_m.float()))
    pruned = compress(model, masks, means, provenance={"method": "fixed-mask stand-in (tests)", "target_ratio": 0.2})
    return save_checkpoint(pruned, out, tokenizer_from=dense_dir, overwrite=True)
