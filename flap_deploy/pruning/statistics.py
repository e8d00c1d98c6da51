"""FLAP's calibration statistics, layer by layer: the inputs of o_proj and down_proj of each resident layer,
and where the ``ls`` refit's covariances come from (kept from this pass, or a second one: the memory plan)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from flap_deploy.model.adapters import LayerModules
from flap_deploy.model.layout import LayerMask, kept_columns
from flap_deploy.pruning.stats import ChannelStats, CovStats
from flap_deploy.streaming.layers import LayerStream, hooks
from flap_deploy.streaming.passes import LayerPass, progress_bar, show_rate


@dataclass
class LayerStats:
    """Statistics of one layer's o_proj input (attention) and down_proj input (MLP). With
    ``calibrate_layers(covariance=...)`` they are ``stats.CovStats``: a covariance accumulator is
    the channel statistics too (over every channel, whatever columns its co-moment keeps)."""

    attn: ChannelStats
    mlp: ChannelStats

    @property
    def attn_cov(self) -> CovStats | None:
        return self.attn if isinstance(self.attn, CovStats) else None

    @property
    def mlp_cov(self) -> CovStats | None:
        return self.mlp if isinstance(self.mlp, CovStats) else None


def input_hooks(m: LayerModules, attn: Callable[[torch.Tensor], Any] | None = None,
                mlp: Callable[[torch.Tensor], Any] | None = None) -> AbstractContextManager[None]:
    """For the block, every input of o_proj goes to ``attn`` and every input of down_proj to ``mlp``
    (a tensor they return replaces the input): how the passes see a layer's channels."""
    return hooks(*((linear, lambda module, args, fn=fn: fn(args[0]))
                   for linear, fn in ((m.o_proj, attn), (m.down_proj, mlp)) if fn is not None))


@torch.no_grad()
def calibrate_layers(
    stream: LayerStream | torch.nn.Module,
    input_ids: torch.Tensor,
    on_layer: Callable[[int, LayerStats], LayerMask | None],
    *,
    batch_size: int = 8,
    propagate_pruned: bool = False,
    buffer_device: torch.device | str | None = None,
    progress: bool = True,
    covariance: Callable[[int], tuple[CovStats | None, CovStats | None]] | None = None,
) -> None:
    """Stream each layer's statistics and hand them to ``on_layer(i, stats)`` while the layer is resident.

    Each layer is fed the dense outputs of the previous one (FLAP). With ``propagate_pruned``
    (the Wanda-sp baseline), ``on_layer`` returns the layer's mask and the layer is run again
    with the pruned channels zeroed, so the next layer sees the pruned outputs instead.
    ``covariance(i)`` gives layer i's (o_proj, down_proj) covariance accumulators, fed by the
    same hooks.
    """
    lp = LayerPass(stream, input_ids, batch_size=batch_size, buffer_device=buffer_device)
    stream = lp.stream
    geom = stream.geometry
    started, done = time.perf_counter(), 0
    bar = progress_bar(geom.num_layers, "calibrate", progress)
    for i in range(geom.num_layers):
        show_rate(bar, f"layer {i}: read", done, started)
        with stream.layer(i):
            m = stream.adapter.layer_modules(stream.model, i)
            dev = stream.device
            stats = LayerStats(*(covariance(i) if covariance is not None else
                                 (ChannelStats(m.o_proj.in_features, dev), ChannelStats(m.down_proj.in_features, dev))))
            show_rate(bar, f"layer {i}: statistics", done, started)
            with input_hooks(m, attn=stats.attn.update, mlp=stats.mlp.update):
                lp.run(stream.layers[i], write=not propagate_pruned)  # Wanda-sp: statistics from the dense pass
            mask = on_layer(i, stats)
            if propagate_pruned and mask is not None:
                kept = kept_columns(mask, geom.head_dim, m.o_proj.in_features, m.down_proj.in_features)
                attn, mlp = (torch.zeros(linear.in_features, dtype=stream.dtype, device=dev).index_fill_(0, c.to(dev), 1)
                             for linear, c in zip((m.o_proj, m.down_proj), kept))
                with input_hooks(m, attn=lambda x: x * attn, mlp=lambda x: x * mlp):
                    lp.run(stream.layers[i])
        done += lp.tokens
        bar.update()
    show_rate(bar, "done", done, started)
    bar.close()


@dataclass
class Statistics:
    """FLAP's calibration statistics of every layer (metric-independent, so reusable across
    ratios, metrics, structures, alignments and reconstructions of the same model and calibration
    set), with the calibration windows (for the ``ls`` pass). With full covariances (``layers[i].
    attn_cov`` / ``mlp_cov``: kept by ``prune`` when ``max_memory`` has room for them, ``pipeline.
    plan_prune``, or by ``collect_statistics(covariance=True)``) the ``ls`` refit needs no second pass; they cost n²
    float64 per module and layer."""

    layers: list[LayerStats]
    calibration: dict[str, Any]
    windows: torch.Tensor | None = None

    @property
    def covariances(self) -> list[tuple[CovStats, CovStats]] | None:
        if all(s.attn_cov is not None and s.mlp_cov is not None for s in self.layers):
            return [(s.attn_cov, s.mlp_cov) for s in self.layers]
        return None


def covariance_nbytes(stream: LayerStream) -> int:
    """Every layer's full float64 input covariances of o_proj and down_proj: what the ``ls`` refit
    holds until the end when its statistics come from the statistics pass."""
    g = stream.geometry
    return g.num_layers * (CovStats.nbytes(g.num_heads * g.head_dim, g.num_heads * g.head_dim)
                           + CovStats.nbytes(g.intermediate_size, g.intermediate_size))


def statistics_nbytes(stream: LayerStream) -> int:
    """What the statistics of every layer hold until the end: per input channel of o_proj and down_proj,
    ChannelStats' float64 mean and M2 (for the allocation and for reuse), the float64 means handed to
    ``compress`` and the float64 scores."""
    g = stream.geometry
    return 32 * g.num_layers * (g.num_heads * g.head_dim + g.intermediate_size)


def full_covariances(stream: LayerStream) -> Callable[[int], tuple[CovStats, CovStats]]:
    """Layer i's (o_proj, down_proj) accumulators over every input column, for ``calibrate_layers``."""
    def full(i: int) -> tuple[CovStats, CovStats]:
        m = stream.adapter.layer_modules(stream.model, i)
        return (CovStats(m.o_proj.in_features, device=stream.device),
                CovStats(m.down_proj.in_features, device=stream.device))

    return full


def held(stats: LayerStats) -> LayerStats:
    """A layer's statistics as they are kept until the allocation: covariances on the host (the device
    holds one layer's accumulators at a time)."""
    for cov in (stats.attn_cov, stats.mlp_cov):
        if cov is not None:
            cov.to("cpu")
    return stats
