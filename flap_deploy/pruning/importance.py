"""Importance scores of the inputs of o_proj and down_proj, per channel, head and unit.

FLAP's metrics (``W`` is the weight of o_proj or down_proj, [out, in]; channel j is an input):

* ``IFV``  — input feature variance: var_j
* ``WIFV`` — weighted input feature variance: var_j * sum_i W_ij^2 (the default)
* ``WIFN`` — weighted input feature norm: mean_i |W_ij| * sqrt(E[x_j^2])

FLAP standardizes each layer's and module's channel scores (zero mean, unit std) so that one
threshold compares them across layers and modules; a query head scores the mean of its
channels. As in the authors' code, the attention channel metric is squared before
standardization. The baselines (Wanda-sp, magnitude-sp) sum channel scores per head and are
never standardized: they only rank units within a layer.
"""

from __future__ import annotations

import torch

from flap_deploy.pruning.stats import ChannelStats, block_slices


def _per_column(weight: torch.Tensor, reduce) -> torch.Tensor:
    """``reduce`` of each input column of ``weight`` in float64, taken over column blocks so that no float64
    copy of the whole weight is made (the same values, bit for bit: each column's reduction is its own)."""
    w = weight.detach()
    return torch.cat([reduce(w[:, cols].double()) for cols in block_slices(w.shape[1])])


def channel_metric(metric: str, weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """One float64 score per input channel of ``weight``."""
    if metric == "IFV":
        return stats.var.to(weight.device)
    if metric == "WIFV":
        return stats.var.to(weight.device) * _per_column(weight, lambda w: w.square().sum(dim=0))
    if metric == "WIFN":
        return _per_column(weight, lambda w: w.abs().mean(dim=0)) * stats.mean_square.to(weight.device).sqrt()
    raise ValueError(f"unknown metric {metric!r}")


def wanda_metric(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """Wanda-sp: mean over output rows of |W_ij| * ||x_j|| (the input norm up to a constant)."""
    return channel_metric("WIFN", weight, stats)


def magnitude_metric(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude-sp: the L2 norm of each input channel's weight column."""
    return _per_column(weight, lambda w: w.norm(dim=0))


def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std over one layer-module's channels (a constant vector scores zero)."""
    std = x.std()
    centred = x - x.mean()
    return centred / std if float(std) > 0 else torch.zeros_like(x)


def head_scores(channel_scores: torch.Tensor, head_dim: int, reduce: str = "mean") -> torch.Tensor:
    """Scores of query heads from the scores of their o_proj input channels."""
    per_head = channel_scores.view(-1, head_dim)
    return per_head.mean(dim=1) if reduce == "mean" else per_head.sum(dim=1)


def flap_scores(metric: str, o_weight: torch.Tensor, o_stats: ChannelStats, down_weight: torch.Tensor,
                down_stats: ChannelStats, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-query-head, per-MLP-channel) standardized FLAP scores of one layer, on the CPU."""
    attn = standardize(channel_metric(metric, o_weight, o_stats).square())
    mlp = standardize(channel_metric(metric, down_weight, down_stats))
    return head_scores(attn, head_dim).cpu(), mlp.cpu()
