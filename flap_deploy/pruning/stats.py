"""Exact streaming per-channel statistics (mean, variance, mean square) in float64.

Batches are merged with Chan et al.'s parallel update, so the result equals ``torch.mean`` /
``torch.var`` over the concatenated inputs whatever the batching. ``CovStats`` adds the
covariance against a subset of columns (the reconstruction's statistics). (The FLAP authors' update
aliases the old and new mean in place and therefore drifts from the true variance.)

One exception to float64 throughout: a batch's co-moment product (``CovStats``, the only cubic
cost of the statistics) is taken in the precision of its input, at least float32, and then
merged in float64. Float64 inputs stay exact; for float32 / bfloat16 activations the product's
rounding (relative ~1e-6 over a batch) is below what the inputs' own rounding already carries,
and float32 products run at twice float64's speed on CPUs (many times on most GPUs).
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
        dtype = x.dtype
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(dim=0)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self._merge(x - mean_b, delta, n_a * n_b / n, dtype)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def _merge(self, centred: torch.Tensor, delta: torch.Tensor, weight: float, dtype: torch.dtype) -> None:
        """Chan's update of the second moments: the batch's own plus the shift between the means
        (``dtype``: the inputs' own, which subclasses may compute products in)."""
        self.m2 = self.m2 + centred.square().sum(dim=0) + delta.square() * weight

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


_TRIANGLE_BLOCKS = 8


def _mirror_upper(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``upper``'s."""
    return upper.triu() + upper.triu(1).T


class CovStats(ChannelStats):
    """ChannelStats plus the co-moment ``sum (x - mu)(x[cols] - mu[cols])^T`` ([channels, len(cols)],
    float64) of every channel against a subset of columns (``cols=None``: all), merged the same
    way: the covariance equals that of the concatenated inputs whatever the batching."""

    def __init__(self, channels: int, cols: torch.Tensor | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(channels, device)
        self.channels = channels
        self.cols = (torch.arange(channels) if cols is None
                     else torch.as_tensor(cols, dtype=torch.long).flatten()).to(device)
        self.full = cols is None
        self.comoment = torch.zeros(channels, self.cols.numel(), dtype=torch.float64, device=device)

    def _merge(self, centred: torch.Tensor, delta: torch.Tensor, weight: float, dtype: torch.dtype) -> None:
        super()._merge(centred, delta, weight, dtype)
        # The batch product is the pass's cost: it runs in the inputs' precision (at least
        # float32); the sums over batches are float64, so many batches add no error of their own.
        c = centred.to(torch.promote_types(dtype, torch.float32))
        if not self.full:
            self.comoment += (c.T @ c[:, self.cols]).to(torch.float64) + torch.outer(delta, delta[self.cols]) * weight
            return
        # Symmetric: only the blocks on and above the diagonal (9/16 of the product's cost);
        # ``covariance`` mirrors them.
        n, step = self.channels, -(-self.channels // _TRIANGLE_BLOCKS)
        for s in range(0, n, step):
            e = min(s + step, n)
            block = (c[:, s:e].T @ c[:, s:]).to(torch.float64)
            self.comoment[s:e, s:] += block + torch.outer(delta[s:e], delta[s:]) * weight

    def to(self, device: torch.device | str) -> CovStats:
        """The same statistics on ``device`` (in place; full first-pass covariances wait on the host)."""
        for name in ("mean", "m2", "cols", "comoment"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def covariance(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Population covariance Sigma[rows, cols] (original channel indices; cols must be accumulated)."""
        cov = self.comoment / max(self.count, 1)
        if self.full:
            cov = _mirror_upper(cov)
        if cols is not None:
            pos = torch.full((self.channels,), -1, dtype=torch.long, device=self.cols.device)
            pos[self.cols] = torch.arange(self.cols.numel(), device=self.cols.device)
            index = pos[torch.as_tensor(cols, dtype=torch.long, device=pos.device)]
            if bool((index < 0).any()):
                raise ValueError("covariance requested for columns that were not accumulated")
            cov = cov[:, index]
        return cov if rows is None else cov[torch.as_tensor(rows, dtype=torch.long, device=cov.device)]
