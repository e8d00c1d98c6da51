"""vLLM general plugin: makes every vLLM process understand flap_llama checkpoints.

Declared in pyproject.toml as the ``vllm.general_plugins`` entry point
``flap_llama = "exporters.vllm.plugin:register"``. vLLM calls ``register()`` in the API
server, the engine core and every worker process, so it must stay cheap and idempotent:
it imports neither torch kernels nor the model module (the model class is registered as
a lazy ``"module:Class"`` string, imported by vLLM only when it builds the model).
"""

from __future__ import annotations

ARCHITECTURE = "FlapLlamaForCausalLM"
MODEL_CLASS = "exporters.vllm.model:FlapLlamaForCausalLM"


def register_config() -> None:
    """Register ``model_type: flap_llama`` with transformers' AutoConfig (no-op if done)."""
    from transformers import AutoConfig

    from flap_deploy.modeling_flap_llama import FlapLlamaConfig

    try:
        AutoConfig.register(FlapLlamaConfig.model_type, FlapLlamaConfig)
    except ValueError:  # already registered in this process (flap_deploy import, second call)
        pass


def register() -> None:
    """The plugin entry point: the vLLM architecture and the transformers config class."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    register_config()
