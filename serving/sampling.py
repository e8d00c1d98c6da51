"""Per-request token choice for the server, on top of `exporters.onnx.sampling`.

The distribution (temperature, top-k, top-p) and the draw are the exporter's
`next_token`; this module adds what only the server needs: banned tokens (`min_tokens`
keeps EOS out until enough tokens exist) and logprobs. Logprobs are those of the model's
raw distribution (as vLLM reports them by default), not of the processed one.
"""

from __future__ import annotations

import numpy as np

from exporters.onnx.sampling import SamplingParams as DrawParams
from exporters.onnx.sampling import next_token


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def sample_next(logits: np.ndarray, draw: DrawParams, rng: np.random.Generator, *,
                banned: tuple[int, ...] = (), want_logprob: bool = False) -> tuple[int, float | None]:
    """The next token id (and its raw logprob if asked); `draw.temperature` 0 is greedy."""
    row = logits
    if banned:
        row = np.array(logits, dtype=np.float64)
        row[list(banned)] = -np.inf
    token = next_token(row, draw, rng)
    logprob = float(log_softmax(logits)[token]) if want_logprob else None
    return token, logprob


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely token ids with their raw logprobs, most likely first."""
    lp = log_softmax(logits)
    k = min(k, lp.shape[-1])
    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]
