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


BLOCKS = 8  # every product and copy of a co-moment runs in row blocks: at most 1/BLOCKS of it at a time


def block_slices(n: int) -> list[slice]:
    """The ``BLOCKS`` row ranges of an n-row matrix."""
    step = max(-(-n // BLOCKS), 1)
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


class CovStats(ChannelStats):
    """ChannelStats plus the co-moment ``sum (x - mu)(x[cols] - mu[cols])^T`` of every channel against a
    subset of columns (``cols=None``: all), float64, merged the same way: the covariance equals that of
    the concatenated inputs whatever the batching.

    Layouts, chosen for the refit that consumes them (``reconstruct.refit_linear``): with ``cols`` the
    co-moment is [channels, len(cols)] with its rows in ``rows`` order, the columns first and then the
    others, so that its first ``len(cols)`` rows are the kept block of the refit's system and the rest
    its removed block, in place; without, it is [channels, channels], accumulated on and above the
    diagonal only (9/16 of the products) and mirrored once before it is read.
    """

    def __init__(self, channels: int, cols: torch.Tensor | None = None, device: torch.device | str = "cpu") -> None:
        super().__init__(channels, device)
        self.channels = channels
        self.full = cols is None
        self.cols = (torch.arange(channels) if cols is None
                     else torch.as_tensor(cols, dtype=torch.long).flatten()).to(device)
        others = torch.ones(channels, dtype=torch.bool, device=device)
        others[self.cols] = False
        self.rows = torch.cat([self.cols, others.nonzero().flatten()]) if not self.full else self.cols
        self.comoment: torch.Tensor | None = torch.zeros(channels, self.cols.numel(), dtype=torch.float64,
                                                         device=device)
        self._mirrored = False

    @staticmethod
    def nbytes(channels: int, cols: int) -> int:
        """The co-moment of ``channels`` inputs against ``cols`` of them."""
        return 8 * channels * cols

    @staticmethod
    def update_nbytes(channels: int, cols: int, rows: int, dtype: torch.dtype) -> int:
        """What one ``update`` of ``rows`` inputs holds beyond the statistics hook's copies of the batch
        (``streaming.plan.HOOK_BYTES``): one row block's product and the batch columns it multiplies."""
        elt = torch.empty((), dtype=torch.promote_types(dtype, torch.float32)).element_size()
        step = -(-channels // BLOCKS)
        return elt * (step * cols + rows * (step + cols))

    def _merge(self, centred: torch.Tensor, delta: torch.Tensor, weight: float, dtype: torch.dtype) -> None:
        super()._merge(centred, delta, weight, dtype)
        # The batch product is the pass's cost: it runs in the inputs' precision (at least
        # float32), one row block at a time, added in place into the float64 sums, so many
        # batches add no error of their own and no copy of the co-moment is ever made.
        c = centred.to(torch.promote_types(dtype, torch.float32))
        self._mirrored = False
        if not self.full:
            right, d_right = c[:, self.cols], delta[self.cols]
            for b in block_slices(self.channels):
                rows = self.rows[b]
                self.comoment[b].add_(c[:, rows].T @ right).addr_(delta[rows], d_right, alpha=weight)
            return
        for b in block_slices(self.channels):  # symmetric: the blocks on and above the diagonal
            self.comoment[b, b.start:].add_(c[:, b].T @ c[:, b.start:]).addr_(delta[b], delta[b.start:],
                                                                                 alpha=weight)

    def to(self, device: torch.device | str) -> CovStats:
        """The same statistics on ``device`` (in place; full first-pass covariances wait on the host)."""
        for name in ("mean", "m2", "cols", "rows", "comoment"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def _mirror(self) -> torch.Tensor:
        """The full co-moment made symmetric in place (its lower blocks from the upper ones), once."""
        if self.full and not self._mirrored:
            m = self.comoment
            for b in block_slices(self.channels):
                m[b.stop:, b].copy_(m[b, b.stop:].T)
                block = m[b, b]
                block.copy_(block.triu() + block.triu(1).T)
            self._mirrored = True
        return self.comoment

    def covariance(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """Population covariance Sigma[rows, cols] (original channel indices; cols must be accumulated)."""
        if self.comoment is None:
            raise ValueError("this co-moment was consumed by a refit")
        cov = self._mirror() / max(self.count, 1)
        dev = self.cols.device
        if not self.full:  # back to the channels' own order
            order = torch.empty_like(self.rows)
            order[self.rows] = torch.arange(self.channels, device=dev)
            cov = cov[order]
        if cols is not None:
            pos = torch.full((self.channels,), -1, dtype=torch.long, device=dev)
            pos[self.cols] = torch.arange(self.cols.numel(), device=dev)
            index = pos[torch.as_tensor(cols, dtype=torch.long, device=dev)]
            if bool((index < 0).any()):
                raise ValueError("covariance requested for columns that were not accumulated")
            cov = cov[:, index]
        return cov if rows is None else cov[torch.as_tensor(rows, dtype=torch.long, device=cov.device)]

    def system(self, kept: torch.Tensor) -> torch.Tensor:
        """The least-squares system of the refit on the ``kept`` columns: the co-moment sums (not divided by
        the count) [channels, len(kept)], rows the kept channels then the removed ones, both ascending.

        An accumulator over exactly ``kept`` hands over its own co-moment (no copy; this object can give no
        covariance after it: the refit factorizes it in place). Full covariances stay as they are: the
        system is gathered from them into a new matrix, one row block at a time."""
        kept = torch.as_tensor(kept, dtype=torch.long, device=self.cols.device).flatten()
        if not self.full:
            if not torch.equal(kept, self.cols):
                raise ValueError("a refit needs the accumulator of its own kept columns")
            system, self.comoment = self.comoment, None
            return system
        full = self._mirror()
        removed = torch.ones(self.channels, dtype=torch.bool, device=kept.device)
        removed[kept] = False
        order = torch.cat([kept, removed.nonzero().flatten()])
        system = torch.empty(self.channels, kept.numel(), dtype=torch.float64, device=full.device)
        for b in block_slices(self.channels):
            system[b] = full[order[b, None], kept]
        return system
