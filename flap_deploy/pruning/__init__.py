"""FLAP (and the Wanda-sp / magnitude-sp baselines), one decoder layer resident at a time.

The flow, one module a step: ``config`` (PruneConfig, validated without torch) → ``methods`` (the
table of methods and reconstruction modes) → ``calibration`` (windows) → ``statistics`` + ``stats``
(the statistics pass) → ``importance`` + ``scores`` (unit scores) → ``allocation`` (widths at an exact
budget) → ``reconstruct`` (compensation of what was removed) → ``compress`` (slicing and writing);
``pipeline.prune`` runs it. ``recipes`` and ``synthetic`` make the models the tests and benchmarks
measure. ``prune``, ``PruneConfig``, ``PrunedModel`` and ``collect_statistics`` are importable from
here (loaded on first use, so importing the config costs no torch).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {"PruneConfig": ".config", "prune": ".pipeline", "PrunedModel": ".pipeline",
         "collect_statistics": ".pipeline", "Statistics": ".statistics"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'flap_deploy.pruning' has no attribute {name!r}")


__all__ = list(_LAZY)
