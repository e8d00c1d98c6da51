"""Next-token choice from one row of logits: greedy, temperature, top-p; logprobs.

Logprobs are those of the model's raw distribution (as vLLM reports them by default),
not of the temperature/top-p-processed one.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def sample_next(logits: np.ndarray, *, temperature: float, top_p: float, rng: np.random.Generator,
                banned: tuple[int, ...] = (), want_logprob: bool = False) -> tuple[int, float | None]:
    """The next token id (and its raw logprob if asked). temperature 0 is greedy (argmax)."""
    row = np.asarray(logits, dtype=np.float64)
    if banned:
        row = row.copy()
        row[list(banned)] = -np.inf
    if temperature <= 0.0:
        token = int(np.argmax(row))
    else:
        z = row / temperature
        z = z - z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = order[: int(np.searchsorted(cum, top_p) + 1)]  # smallest prefix reaching top_p
            mask = np.zeros_like(probs)
            mask[keep] = probs[keep]
            probs = mask / mask.sum()
        token = int(rng.choice(len(probs), p=probs))
    logprob = float(log_softmax(np.asarray(logits))[token]) if want_logprob else None
    return token, logprob


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely token ids with their raw logprobs, most likely first."""
    lp = log_softmax(np.asarray(logits))
    k = min(k, lp.shape[-1])
    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]
