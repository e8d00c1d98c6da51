"""flap-deploy: FLAP structured pruning and deployment of per-layer-width LLMs.

Importing the package registers ``flap_llama`` with transformers' AutoConfig and
AutoModelForCausalLM, so ``AutoModelForCausalLM.from_pretrained(pruned_dir)`` works without
``trust_remote_code`` (``model.registration``: at once when transformers is loaded, else as it
loads). The names below are imported on first use, so ``import flap_deploy`` itself costs no
torch: a configuration error comes back before anything heavy is loaded.

Subpackages, in the order they build on each other: ``model`` (the per-layer-width architecture
and its contract), ``io`` (models on disk), ``streaming`` (one layer resident at a time),
``pruning`` (FLAP and the baselines), then ``heal`` (distillation after pruning), ``evaluation`` and
``generation``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .model.registration import register_auto_classes, register_when_transformers_loads
from .version import __version__

_LAZY = {
    "FlapLlamaConfig": "flap_deploy.model.modeling_flap_llama",
    "FlapLlamaForCausalLM": "flap_deploy.model.modeling_flap_llama",
    "PruneConfig": "flap_deploy.pruning.config",
    "PrunedModel": "flap_deploy.pruning.pipeline",
    "prune": "flap_deploy.pruning.pipeline",
    "load_model": "flap_deploy.io.model_ref",
    "resolve_model": "flap_deploy.io.model_ref",
}

register_when_transformers_loads()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flap_deploy' has no attribute {name!r}")


__all__ = [*_LAZY, "register_auto_classes", "__version__"]
