"""The pruning methods and the reconstruction modes: one entry each, and no torch (the CLI lists them).

A method names its scorer (a function of ``scores``, called as ``scorer(stream, config, calibration,
statistics, align, plan) -> Scores``), whether it runs calibration windows, how its widths are allocated
and recorded, and whether the configured reconstruction applies to it. A reconstruction mode names its
function of ``reconstruct`` (``(stream, config, scores, calibration, masks) -> Compensation``). A new
method or mode is one entry here and its function there.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    scorer: str
    calibrates: bool
    adaptive: bool  # FLAP's configured metric and structure; otherwise uniform per layer (UL-UM)
    compensates: bool  # the configured reconstruction applies; otherwise the kept columns as they are
    metric: str | None = None  # what a method that is not adaptive records as its metric
    reuses_statistics: bool = False  # an earlier run's ``Statistics`` stand in for calibration

    def structure(self, config: Any) -> str:
        return config.structure if self.adaptive else "UL-UM"

    def needs_calibration(self, statistics: Any) -> bool:
        return self.calibrates and not (self.reuses_statistics and statistics is not None)

    def provenance(self, config: Any) -> dict[str, Any]:
        return {"method": self.name, "metric": config.metric if self.adaptive else self.metric,
                "structure": self.structure(config), "attn_ratio": config.effective_attn_ratio if self.adaptive else None}

    def score(self, *args: Any) -> Any:
        return getattr(import_module(".scores", __package__), self.scorer)(*args)


@dataclass(frozen=True)
class Reconstruction:
    name: str
    help: str
    builder: str
    covariances: bool = False  # refits from the dense inputs' covariances (``statistics.plan_covariances``)

    def build(self, *args: Any) -> Any:
        return getattr(import_module(".reconstruct", __package__), self.builder)(*args)


METHODS = {m.name: m for m in (
    Method("flap", "FLAP: fluctuation scores standardized across layers, adaptive widths, compensation",
           "score_flap", calibrates=True, adaptive=True, compensates=True, reuses_statistics=True),
    Method("wanda-sp", "Wanda-sp baseline: |W| x input norm, uniform per layer, pruned outputs propagated",
           "score_wanda_sp", calibrates=True, adaptive=False, compensates=False, metric="wanda"),
    Method("mag-sp", "magnitude-sp baseline: weights only, uniform per layer, no calibration",
           "score_magnitude_sp", calibrates=False, adaptive=False, compensates=False, metric="magnitude"),
)}

RECONSTRUCTIONS = {r.name: r for r in (
    Reconstruction("none", "the kept columns as they are", "no_compensation"),
    Reconstruction("bias", "the paper's calibration-mean biases", "mean_compensation"),
    Reconstruction("ls", "least-squares refit of the kept columns on the dense calibration inputs", "ls_refit",
                   covariances=True),
)}
