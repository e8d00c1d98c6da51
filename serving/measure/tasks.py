"""Dense vs pruned accuracy on lm-eval tasks: what `flap-deploy eval --tasks`, the demo's task step and
benchmarks/tasks.py run.

The task choice and one lm-eval run are the core's (``flap_deploy.evaluation.tasks``); the runtimes
that evaluate are one table here (``TASK_BACKENDS``), because one of them starts a vLLM engine,
which the core must not know about. Everything is checked (limit, tasks and their data, models,
the runtime) before the first model loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flap_deploy.errors import ParameterError
from flap_deploy.io.model_ref import ModelRef
from flap_deploy.io.streams import stdout_to_stderr


@dataclass(frozen=True)
class TaskBackend:
    name: str
    summary: str  # for --help
    check: Callable[[ModelRef], None]  # every check before a model loads
    # one model on the loaded tasks: (model, tasks, limit, batch size, dtype, progress) -> run_tasks' result
    run: Callable[[ModelRef, list[Any], int | None, int, str, bool], dict[str, Any]]


def _run_hf(ref: ModelRef, tasks: list[Any], limit: int | None, batch_size: int, dtype: str,
            progress: bool) -> dict[str, Any]:
    from flap_deploy.evaluation.tasks import run_tasks

    return run_tasks(ref, tasks, limit=limit, batch_size=batch_size, dtype=dtype, progress=progress)


def _check_vllm(ref: ModelRef) -> None:
    from serving.vllm.launcher import check_servable, check_vllm_installed

    check_vllm_installed()
    check_servable(ref)


def _run_vllm(ref: ModelRef, tasks: list[Any], limit: int | None, batch_size: int, dtype: str,
              progress: bool) -> dict[str, Any]:
    from serving.vllm.tasks import run_tasks_vllm

    # vLLM schedules its own batches: the batch size is the hf backend's
    return run_tasks_vllm(ref, tasks, limit=limit, dtype=dtype, progress=progress)


TASK_BACKENDS: dict[str, TaskBackend] = {b.name: b for b in (
    TaskBackend("hf", "PyTorch through transformers", check=lambda ref: None, run=_run_hf),
    TaskBackend("vllm", "a vLLM engine", check=_check_vllm, run=_run_vllm),
)}


def task_comparison(model: str | ModelRef, tasks: str, *, reference: str | ModelRef | None = None, limit: int | None = None,
                    backend: str = "hf", dtype: str = "float32", batch_size: int = 16,
                    task_text: str | os.PathLike | None = None, plot: str | os.PathLike | bool | None = True,
                    quiet: bool = False) -> dict[str, Any]:
    """Check everything first (backend, limit, tasks and their data, models), then run lm-eval on the
    reference and the model; return both results, the chance levels, the comparison rows and the plot
    path (``plot=True``: MODEL_DIR/flap_tasks.png). ``quiet``: progress and engine logs go to stderr,
    so that stdout stays clean for JSON."""
    from flap_deploy.evaluation.task_report import compare_results, plot_comparison
    from flap_deploy.evaluation.tasks import check_limit, load_tasks, select_tasks
    from flap_deploy.io.model_ref import CHECKPOINTS, resolve_model

    if backend not in TASK_BACKENDS:
        raise ParameterError("backend", f"{backend!r}: choose one of {', '.join(TASK_BACKENDS)}")
    b = TASK_BACKENDS[backend]
    check_limit(limit)
    selection = select_tasks(tasks, task_text=task_text)
    ref = resolve_model(model, accept=CHECKPOINTS)
    dense = resolve_model(reference, accept=CHECKPOINTS) if reference else None
    for r in (dense, ref):
        if r is not None:
            b.check(r)
    loaded = load_tasks(selection)

    def run(r: ModelRef) -> dict[str, Any]:
        with stdout_to_stderr(quiet):
            return b.run(r, loaded, limit, batch_size, dtype, not quiet)

    dense_result = run(dense) if dense else None
    result = run(ref)
    plot_path = None
    if plot is True:  # beside the model, unless it is a Hub snapshot (left as fetched)
        plot = None if ref.revision else ref.path / "flap_tasks.png"
    if dense_result and plot:
        plot_path = plot_comparison(result, dense_result, Path(plot), selection.chance)
    return {"model": result, "reference": dense_result, "chance": selection.chance,
            "comparison": compare_results(dense_result, result) if dense_result else None,
            "plot": str(plot_path) if plot_path else None}
