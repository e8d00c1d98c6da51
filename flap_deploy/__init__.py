"""flap-deploy: FLAP structured pruning and deployment of per-layer-width LLMs.

Importing the package registers ``flap_llama`` with transformers' AutoConfig and
AutoModelForCausalLM (``register_auto_classes``), so
``AutoModelForCausalLM.from_pretrained(pruned_dir)`` works without ``trust_remote_code``.
"""

from __future__ import annotations

from .modeling_flap_llama import FlapLlamaConfig, FlapLlamaForCausalLM

__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Register ``model_type: flap_llama`` with AutoConfig and AutoModelForCausalLM (idempotent).

    The one registration of the architecture with transformers; ``import flap_deploy`` and
    the vLLM plugin (``exporters.vllm.plugin.register``) both call it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoConfig.register(FlapLlamaConfig.model_type, FlapLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(FlapLlamaConfig, FlapLlamaForCausalLM, exist_ok=True)


register_auto_classes()

from .pruning import PruneConfig, PrunedModel, prune  # noqa: E402  (after registration)

__all__ = [
    "FlapLlamaConfig",
    "FlapLlamaForCausalLM",
    "PruneConfig",
    "PrunedModel",
    "prune",
    "register_auto_classes",
    "__version__",
]
