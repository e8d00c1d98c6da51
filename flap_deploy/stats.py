"""Exact streaming per-channel statistics (mean, variance, mean square) in float64.

Batches are merged with Chan et al.'s parallel update, so the result equals ``torch.mean`` /
``torch.var`` over the concatenated inputs whatever the batching. (The FLAP authors' update
aliases the old and new mean in place and therefore drifts from the true variance.)
"""

from __future__ import annotations

import torch


class ChannelStats:
    """Running count, mean and sum of squared deviations (M2) over the last dimension's channels."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add every row of ``x`` (any leading shape, channels last)."""
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        var_b, mean_b = torch.var_mean(x, dim=0, correction=0)  # one fused pass
        m2_b = var_b * n_b
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.count = n

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (``torch.var``'s default), the FLAP "fluctuation"."""
        if self.count < 2:
            return torch.zeros_like(self.m2)
        return self.m2 / (self.count - 1)

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x²] per channel (Wanda's squared input norm divided by the row count)."""
        if self.count == 0:
            return torch.zeros_like(self.m2)
        return self.m2 / self.count + self.mean.square()
