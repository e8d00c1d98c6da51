"""The pruning methods, the reconstruction modes and the width searches: one table each, every entry beside
its function (a search's runs in ``search``).

A method is its scorer (``scorer(stream, config, calibration, statistics, align, plan) -> Scores``: one
score per query head and per MLP channel of every layer), whether it runs calibration windows, how its
widths are allocated and recorded, and whether the configured reconstruction applies to it. A
reconstruction mode is its builder (``(stream, config, scores, calibration, masks) -> Compensation``).
A width search is its runner (``(stream, config, scores, allocation, align) -> SearchResult``), or none
for FLAP's allocation as it is. A new method, mode or search is its function and its entry here (and its tests): the pipeline, the config's
validation, the provenance and the CLI's choices all read the tables, and nothing else names a method.

No torch at import (the CLI lists the tables for ``--help``): the functions import what they run on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from flap_deploy.streaming.layers import LayerStream
    from flap_deploy.streaming.plan import MemoryPlan

    from .allocation import Alignment
    from .compress import LayerMeans
    from .reconstruct import LayerRefit
    from .statistics import LayerStats, Statistics


@dataclass
class Calibration:
    """The windows of a run and how to run layers over them (shared by the methods that calibrate)."""

    input_ids: torch.Tensor
    description: dict[str, Any]
    batch_size: int
    buffer_device: str | None
    progress: bool


@dataclass
class Scores:
    """What a method's scoring hands to the allocation: one score per query head (``attn``) and per
    MLP channel (``mlp``) of every layer, the calibration means for bias compensation (FLAP only),
    the calibration's description and FLAP's reusable statistics."""

    attn: list[torch.Tensor]
    mlp: list[torch.Tensor]
    means: list[LayerMeans] | None = None
    calibration: dict[str, Any] | None = None
    statistics: Statistics | None = None


# ---------------------------------------------------------------- the methods' scorers

def score_flap(stream: LayerStream, config: Any, calib: Calibration | None, statistics: Statistics | None,
               align: Alignment, plan: MemoryPlan) -> Scores:
    """FLAP: the configured metric on dense-calibration statistics, standardized per layer and module.
    With ``statistics`` from an earlier run, only o_proj / down_proj weights are read, layer by layer.
    Every layer's full input covariances are kept with the statistics when the plan says so
    (``pipeline.plan_prune``: a ``max_memory`` with room for them)."""
    from flap_deploy.errors import FlapDeployError

    from .compress import LayerMeans
    from .importance import flap_scores
    from .statistics import Statistics, calibrate_layers, full_covariances, held

    geom = stream.geometry

    def score(i: int, stats: LayerStats) -> None:
        m = stream.adapter.layer_modules(stream.model, i)
        a, s = flap_scores(config.metric, m.o_proj.weight, stats.attn, m.down_proj.weight, stats.mlp, geom.head_dim)
        scores.attn.append(a)
        scores.mlp.append(s)
        scores.means.append(LayerMeans(attn=stats.attn.mean.cpu(), mlp=stats.mlp.mean.cpu()))

    if statistics is not None:
        if len(statistics.layers) != geom.num_layers:
            raise FlapDeployError(f"statistics of {len(statistics.layers)} layers for a model of {geom.num_layers}")
        scores = Scores(attn=[], mlp=[], means=[], calibration=statistics.calibration, statistics=statistics)
        for i, stats in enumerate(statistics.layers):
            with stream.layer(i):
                score(i, stats)
        return scores
    kept: list[LayerStats] = []
    scores = Scores(attn=[], mlp=[], means=[], calibration=calib.description,
                    statistics=Statistics(kept, calib.description, windows=calib.input_ids))

    def on_layer(i: int, stats: LayerStats) -> None:
        score(i, stats)
        kept.append(held(stats))

    calibrate_layers(stream, calib.input_ids, on_layer, batch_size=calib.batch_size,
                     buffer_device=calib.buffer_device, progress=calib.progress,
                     covariance=full_covariances(stream) if plan.covariance_bytes else None)
    return scores


def score_wanda_sp(stream: LayerStream, config: Any, calib: Calibration, statistics: Any, align: Alignment,
                   plan: MemoryPlan) -> Scores:
    """Wanda-sp: uniform per layer, each layer's widths decided during calibration so the next
    layer sees pruned outputs."""
    from .allocation import allocate
    from .importance import head_scores, wanda_metric
    from .statistics import calibrate_layers

    geom = stream.geometry
    scores = Scores(attn=[], mlp=[], calibration=calib.description)
    one_layer = replace(geom, num_layers=1)

    def on_layer(i: int, stats: LayerStats) -> Any:
        m = stream.adapter.layer_modules(stream.model, i)
        a = head_scores(wanda_metric(m.o_proj.weight, stats.attn), geom.head_dim, "sum").cpu()
        s = wanda_metric(m.down_proj.weight, stats.mlp).cpu()
        scores.attn.append(a)
        scores.mlp.append(s)
        return allocate([a], [s], one_layer, ratio=config.ratio, structure="UL-UM",
                        granularity=config.attn_granularity, align=align).masks[0]

    calibrate_layers(stream, calib.input_ids, on_layer, batch_size=calib.batch_size, propagate_pruned=True,
                     buffer_device=calib.buffer_device, progress=calib.progress)
    return scores


def score_magnitude_sp(stream: LayerStream, config: Any, calib: Any, statistics: Any, align: Alignment,
                       plan: MemoryPlan) -> Scores:
    """Magnitude-sp: weights only, no calibration."""
    from flap_deploy.streaming.passes import progress_bar

    from .importance import head_scores, magnitude_metric

    geom = stream.geometry
    scores = Scores(attn=[], mlp=[])
    bar = progress_bar(geom.num_layers, "score", config.progress)
    for i in range(geom.num_layers):
        with stream.layer(i):
            m = stream.adapter.layer_modules(stream.model, i)
            scores.attn.append(head_scores(magnitude_metric(m.o_proj.weight), geom.head_dim, "sum").cpu())
            scores.mlp.append(magnitude_metric(m.down_proj.weight).cpu())
        bar.update()
    bar.close()
    return scores


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    scorer: Callable[..., Scores]
    calibrates: bool
    adaptive: bool  # FLAP's configured metric and structure; otherwise uniform per layer (UL-UM)
    compensates: bool  # the configured reconstruction applies; otherwise the kept columns as they are
    metric: str | None = None  # what a method that is not adaptive records as its metric
    reuses_statistics: bool = False  # an earlier run's ``Statistics`` stand in for calibration
    searchable: bool = False  # a width search can start from its allocation (needs its statistics)

    def structure(self, config: Any) -> str:
        return config.structure if self.adaptive else "UL-UM"

    def needs_calibration(self, statistics: Any) -> bool:
        return self.calibrates and not (self.reuses_statistics and statistics is not None)

    def provenance(self, config: Any) -> dict[str, Any]:
        return {"method": self.name, "metric": config.metric if self.adaptive else self.metric,
                "structure": self.structure(config), "attn_ratio": config.effective_attn_ratio if self.adaptive else None}


METHODS = {m.name: m for m in (
    Method("flap", "FLAP: fluctuation scores standardized across layers, adaptive widths, compensation",
           score_flap, calibrates=True, adaptive=True, compensates=True, reuses_statistics=True,
           searchable=True),
    Method("wanda-sp", "Wanda-sp baseline: |W| x input norm, uniform per layer, pruned outputs propagated",
           score_wanda_sp, calibrates=True, adaptive=False, compensates=False, metric="wanda"),
    Method("mag-sp", "magnitude-sp baseline: weights only, uniform per layer, no calibration",
           score_magnitude_sp, calibrates=False, adaptive=False, compensates=False, metric="magnitude"),
)}


# ---------------------------------------------------------------- the reconstruction modes' builders

@dataclass
class Compensation:
    """What a reconstruction mode hands to the writing pass: calibration ``means`` (``bias``), a
    ``refit(i, modules) -> LayerRefit`` called while layer i is resident (``ls``), and the record the
    provenance keeps."""

    means: list[LayerMeans] | None
    refit: Callable[[int, Any], LayerRefit] | None
    record: dict[str, Any]


def no_compensation(stream: LayerStream, config: Any, scores: Scores, calib: Any, masks: list) -> Compensation:
    return Compensation(None, None, {"mode": "none", "ridge": None, "statistics": None})


def mean_compensation(stream: LayerStream, config: Any, scores: Scores, calib: Any, masks: list) -> Compensation:
    return Compensation(scores.means, None, {"mode": "bias", "ridge": None, "statistics": {
        "means": "float64 calibration means of the o_proj / down_proj inputs", "calibration": scores.calibration}})


def ls_refit(stream: LayerStream, config: Any, scores: Scores, calib: Calibration | None, masks: list) -> Compensation:
    """The ``ls`` refit of every layer while it is written. Its dense-input covariances over the columns
    the allocation keeps come from full first-pass covariances when the statistics hold them, else from
    the writing pass itself (``reconstruct.RefitPass``: the calibration windows run through the dense
    layers again, one resident at a time, each layer refitted before it is sliced), so memory stays one
    layer's."""
    from .reconstruct import RefitPass, refit_layer

    stats = scores.statistics
    record = {"mode": "ls", "ridge": config.ridge, "statistics": {
        "covariance": "float64, dense calibration inputs of o_proj and down_proj", "calibration": stats.calibration}}
    covariances = stats.covariances
    if covariances is not None:
        record["statistics"]["pass"] = "first (full covariances kept with the statistics)"

        def refit(i: int, m: Any) -> LayerRefit:
            return refit_layer(m.o_proj, m.down_proj, *covariances[i], masks[i], stream.geometry.head_dim,
                               config.ridge)

        return Compensation(None, refit, record)
    record["statistics"]["pass"] = "second (while writing, kept columns only)"
    windows = stats.windows if stats.windows is not None else calib.input_ids
    return Compensation(None, RefitPass(stream, windows, masks, config.ridge, batch_size=config.batch_size,
                                        buffer_device=calib.buffer_device if calib is not None else None), record)


@dataclass(frozen=True)
class Reconstruction:
    name: str
    help: str
    build: Callable[..., Compensation]
    covariances: bool = False  # refits from the dense inputs' covariances (``pipeline.plan_prune``)


RECONSTRUCTIONS = {r.name: r for r in (
    Reconstruction("none", "the kept columns as they are", no_compensation),
    Reconstruction("bias", "the paper's calibration-mean biases", mean_compensation),
    Reconstruction("ls", "least-squares refit of the kept columns on the dense calibration inputs", ls_refit,
                   covariances=True),
)}


# ---------------------------------------------------------------- the width searches

def evolve(*args: Any) -> Any:
    # imported when a search runs: search.py imports torch, and the CLI lists this table for --help
    from .search import evolve

    return evolve(*args)


@dataclass(frozen=True)
class Search:
    name: str
    help: str
    run: Callable[..., Any] | None  # None: the allocation as it is


SEARCHES = {s.name: s for s in (
    Search("none", "FLAP's allocation as it is (one global threshold on the scores)", None),
    Search("evo", "evolutionary search of per-layer widths from FLAP's allocation, against the whole model's "
                  "KL to the dense one on calibration windows", evolve),
)}
