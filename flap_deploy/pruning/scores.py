"""The methods' scorers (``methods.METHODS``): one score per query head and per MLP channel of every layer.

Every scorer is called as ``scorer(stream, config, calibration, statistics, align, plan)``; FLAP's also keeps
its calibration statistics for reuse and for the ``ls`` refit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from flap_deploy.errors import FlapDeployError
from flap_deploy.model.layout import LayerMask
from flap_deploy.streaming.layers import LayerStream
from flap_deploy.streaming.passes import progress_bar
from flap_deploy.streaming.plan import MemoryPlan

from .allocation import Alignment, allocate
from .compress import LayerMeans
from .config import PruneConfig
from .importance import flap_scores, head_scores, magnitude_metric, wanda_metric
from .statistics import LayerStats, Statistics, calibrate_layers, full_covariances, held


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


@dataclass
class Calibration:
    """The windows of a run and how to run layers over them (shared by the methods that calibrate)."""

    input_ids: torch.Tensor
    description: dict[str, Any]
    batch_size: int
    buffer_device: str | None
    progress: bool


def _flap_layer(stream: LayerStream, i: int, stats: LayerStats, metric: str, scores: Scores) -> None:
    m = stream.adapter.layer_modules(stream.model, i)
    a, s = flap_scores(metric, m.o_proj.weight, stats.attn, m.down_proj.weight, stats.mlp, stream.geometry.head_dim)
    scores.attn.append(a)
    scores.mlp.append(s)
    scores.means.append(LayerMeans(attn=stats.attn.mean.cpu(), mlp=stats.mlp.mean.cpu()))


def score_flap(stream: LayerStream, config: PruneConfig, calib: Calibration | None, statistics: Statistics | None,
               align: Alignment, plan: MemoryPlan) -> Scores:
    """FLAP: the configured metric on dense-calibration statistics, standardized per layer and module.
    With ``statistics`` from an earlier run, only o_proj / down_proj weights are read, layer by layer.
    Every layer's full input covariances are kept with the statistics when the plan says so
    (``pipeline.plan_prune``: a ``max_memory`` with room for them)."""
    geom = stream.geometry
    if statistics is not None:
        if len(statistics.layers) != geom.num_layers:
            raise FlapDeployError(f"statistics of {len(statistics.layers)} layers for a model of {geom.num_layers}")
        scores = Scores(attn=[], mlp=[], means=[], calibration=statistics.calibration, statistics=statistics)
        for i, stats in enumerate(statistics.layers):
            with stream.layer(i):
                _flap_layer(stream, i, stats, config.metric, scores)
        return scores
    kept: list[LayerStats] = []
    scores = Scores(attn=[], mlp=[], means=[], calibration=calib.description,
                    statistics=Statistics(kept, calib.description, windows=calib.input_ids))

    def on_layer(i: int, stats: LayerStats) -> None:
        _flap_layer(stream, i, stats, config.metric, scores)
        kept.append(held(stats))

    calibrate_layers(stream, calib.input_ids, on_layer, batch_size=calib.batch_size,
                     buffer_device=calib.buffer_device, progress=calib.progress,
                     covariance=full_covariances(stream) if plan.covariance_bytes else None)
    return scores


def score_wanda_sp(stream: LayerStream, config: PruneConfig, calib: Calibration, statistics: Any, align: Alignment,
                   plan: MemoryPlan) -> Scores:
    """Wanda-sp: uniform per layer, each layer's widths decided during calibration so the next
    layer sees pruned outputs."""
    geom = stream.geometry
    scores = Scores(attn=[], mlp=[], calibration=calib.description)
    one_layer = replace(geom, num_layers=1)

    def on_layer(i: int, stats: LayerStats) -> LayerMask:
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


def score_magnitude_sp(stream: LayerStream, config: PruneConfig, calib: Any, statistics: Any, align: Alignment,
                       plan: MemoryPlan) -> Scores:
    """Magnitude-sp: weights only, no calibration."""
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
