"""How the next token is chosen, in plain numpy: one vocabulary for every runtime.

``SamplingParams`` uses OpenAI's names; PyTorch generation (``flap_deploy.generation.generate``),
ONNX Runtime generation (``exporters.onnx.runtime``) and the serving engine all take it.
One row of logits at a time, so a batched server can give every request its own
temperature / top-k / top-p / seed. Temperature 0 means greedy. Logprobs are those of the
model's raw distribution (as vLLM reports them by default), not of the processed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from flap_deploy.errors import ParameterError

# Temperatures below this are greedy (as in vLLM): logits / 1e-320 overflow to inf.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    The defaults are the library's (greedy, 32 tokens); the server applies OpenAI's own
    defaults (temperature 1, ...) when it builds one from a request.
    """

    max_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)  # text is cut before the earliest one
    stop_token_ids: Sequence[int] = field(default_factory=tuple)  # end the request (beside the model's EOS)
    ignore_eos: bool = False
    min_tokens: int = 0  # stop tokens are banned until this many tokens exist
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top k

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ParameterError("max_tokens", f"must be >= 0, got {self.max_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN fails the first test
            raise ParameterError("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails it too
            raise ParameterError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ParameterError("top_k", f"must be >= 0, got {self.top_k}")
        if self.min_tokens < 0:
            raise ParameterError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ParameterError("logprobs", f"must be >= 0, got {self.logprobs}")
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids or ())

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def rng(self) -> np.random.Generator:
        """A generator for this request: reproducible when a seed is given."""
        return np.random.default_rng(self.seed)


def probabilities(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Sampling distribution over the vocabulary for one row of logits (float64)."""
    x = np.asarray(logits, dtype=np.float64) / max(temperature, GREEDY_BELOW)
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


def next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None = None, *,
               banned: Sequence[int] = ()) -> int:
    """Pick the next token from one row of logits; ``banned`` ids are never chosen."""
    if banned:
        logits = np.array(logits, dtype=np.float64)
        logits[list(banned)] = -np.inf
    if params.greedy:
        return int(np.argmax(logits))
    p = probabilities(logits, params.temperature, params.top_k, params.top_p)
    rng = rng if rng is not None else params.rng()
    return int(rng.choice(p.shape[-1], p=p))


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Raw log-probabilities of one row of logits (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely token ids with their raw logprobs, most likely first."""
    lp = log_softmax(logits)
    k = min(k, lp.shape[-1])
    idx = np.argpartition(-lp, k - 1)[:k]
    idx = idx[np.argsort(-lp[idx], kind="stable")]
    return [(int(i), float(lp[i])) for i in idx]
