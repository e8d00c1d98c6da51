"""Registration of ``flap_llama`` with transformers' Auto classes, without importing transformers first.

``register_auto_classes`` is the one registration (loaders in this package and the vLLM plugin call it).
``register_when_transformers_loads`` is what ``import flap_deploy`` does: register now if transformers'
auto classes are already loaded, else the moment they are. Importing flap_deploy thereby keeps its
documented effect (``AutoModelForCausalLM.from_pretrained(pruned_dir)`` works) while loading neither
torch nor transformers itself, so the CLI's value errors come back before any heavy import. The hook
waits until the outermost transformers import has finished, because registering imports the modeling
file, which needs modules (``transformers.modeling_utils``) that may be half-initialized until then.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

_AUTO = "transformers.models.auto.configuration_auto"
_MODELING = __name__.rsplit(".", 1)[0] + ".modeling_flap_llama"
_registered = False


def register_auto_classes() -> None:
    """Register ``model_type: flap_llama`` with AutoConfig and AutoModelForCausalLM (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_flap_llama import FlapLlamaConfig, FlapLlamaForCausalLM

    AutoConfig.register(FlapLlamaConfig.model_type, FlapLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(FlapLlamaConfig, FlapLlamaForCausalLM, exist_ok=True)
    _registered = True


def _watched(name: str) -> bool:
    """Transformers' modules, and the modeling file, which imports transformers while it is itself half-made."""
    return name.split(".")[0] == "transformers" or name == _MODELING


def _initializing(skip: str | None = None) -> bool:
    return any(getattr(getattr(m, "__spec__", None), "_initializing", False)
               for name, m in list(sys.modules.items()) if _watched(name) and name != skip)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the watched modules; after one of them finishes with the auto classes loaded
    and none still initializing, registers and removes itself."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if not _watched(name):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        finder = self

        class Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                finder.maybe_register(module.__name__)

            def __getattr__(self, attr: str) -> Any:  # get_resource_reader, is_package, ...
                return getattr(loader, attr)

        spec.loader = Loader()
        return spec

    def maybe_register(self, just_loaded: str) -> None:
        if _AUTO not in sys.modules or _registered:
            return
        if _initializing(skip=just_loaded):  # its own spec says so until exec returns
            return
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        register_auto_classes()


def register_when_transformers_loads() -> None:
    if _registered:
        return
    if _AUTO in sys.modules and not _initializing():
        register_auto_classes()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
