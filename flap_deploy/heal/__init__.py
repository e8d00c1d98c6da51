"""Heal: a short distillation of a pruned checkpoint from its dense model, the step of the flow after pruning.

``config`` (HealConfig, validated without torch) → ``distill`` (the checks, the training loop, the healed
checkpoint) with ``state`` (resumable training states). ``heal`` and ``HealConfig`` are importable from here
(loaded on first use, so importing the config costs no torch).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"HealConfig": ".config", "heal": ".distill", "check_inputs": ".distill"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'flap_deploy.heal' has no attribute {name!r}")


__all__ = list(_LAZY)
