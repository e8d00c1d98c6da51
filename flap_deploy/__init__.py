"""flap-deploy: FLAP structured pruning and deployment of per-layer-width LLMs.

Importing the package registers ``flap_llama`` with transformers' AutoConfig and
AutoModelForCausalLM, so ``AutoModelForCausalLM.from_pretrained(pruned_dir)`` works
without ``trust_remote_code``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from .modeling_flap_llama import FlapLlamaConfig, FlapLlamaForCausalLM

__version__ = "0.1.0"


def _register() -> None:
    try:
        AutoConfig.register(FlapLlamaConfig.model_type, FlapLlamaConfig)
    except ValueError:  # already registered (e.g. by the vLLM plugin in the same process)
        pass
    try:
        AutoModelForCausalLM.register(FlapLlamaConfig, FlapLlamaForCausalLM)
    except ValueError:
        pass


_register()

from .pruning import PruneConfig, PrunedModel, prune  # noqa: E402  (after registration)

__all__ = ["FlapLlamaConfig", "FlapLlamaForCausalLM", "PruneConfig", "PrunedModel", "prune", "__version__"]
