"""Next-token choice and stop strings, in plain numpy (shared with the ONNX server).

One row of logits at a time, so a batched server can give every request its own
temperature / top-k / top-p / seed. Temperature 0 means greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    """How to pick tokens for one request."""

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        """A generator for this request: reproducible when a seed is given."""
        return np.random.default_rng(self.seed)


def probabilities(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Sampling distribution over the vocabulary for one row of logits (float64)."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k)[-top_k]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cum, top_p)) + 1
        keep = np.zeros_like(p, dtype=bool)
        keep[order[:cut]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None = None) -> int:
    """Pick the next token from one row of logits."""
    if params.greedy:
        return int(np.argmax(logits))
    p = probabilities(logits, params.temperature, params.top_k, params.top_p)
    rng = rng if rng is not None else params.rng()
    return int(rng.choice(p.shape[-1], p=p))


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None
