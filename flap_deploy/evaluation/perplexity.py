"""Perplexity, and agreement with a reference (dense) model, on fixed token windows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flap_deploy.errors import FlapDeployError, ParameterError


@dataclass
class EvalResult:
    """Figures over ``tokens`` predicted positions of ``windows`` windows of ``seqlen`` tokens."""

    perplexity: float
    tokens: int
    windows: int
    seqlen: int
    reference_perplexity: float | None = None
    kl: float | None = None
    top1_agreement: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def token_windows(tokenizer: Any, text: str, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] of the text's tokens (first ``max_tokens`` tokens at most)."""
    if seqlen < 2:
        raise ParameterError("seqlen", f"must be at least 2, got {seqlen}")
    if max_tokens is not None and max_tokens < seqlen:
        raise ParameterError("max_tokens", f"{max_tokens} is less than one window of {seqlen} tokens")
    # Tokenizing a long text is slow; with a token budget, a prefix of the text suffices.
    chars = len(text) if max_tokens is None else min(len(text), max_tokens * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if max_tokens is None or len(ids) >= max_tokens or chars >= len(text):
            break
        chars = min(len(text), chars * 2)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // seqlen
    if n == 0:
        raise FlapDeployError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen)


@torch.no_grad()
def log_probs(model: torch.nn.Module, window: torch.Tensor) -> torch.Tensor:
    """Float32 next-token log-probabilities [batch, seqlen - 1, vocab] of token windows."""
    logits = model(input_ids=window, use_cache=False).logits[:, :-1].float()
    return F.log_softmax(logits, dim=-1)


@dataclass
class Tally:
    """Running sums over predicted positions: the model's NLL and, against a reference, the
    reference's NLL, KL(reference‖model) and top-1 agreement. Add windows one batch at a time."""

    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    count: int = 0
    with_reference: bool = False

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref_logp: torch.Tensor | None = None) -> None:
        """One batch: ``logp`` / ``ref_logp`` from ``log_probs``, ``targets`` = the windows' tokens [:, 1:]."""
        self.nll -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        self.count += targets.numel()
        if ref_logp is not None:
            self.with_reference = True
            self.ref_nll -= ref_logp.gather(-1, targets.unsqueeze(-1)).sum().item()
            self.kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            self.agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()

    def result(self, windows: int, seqlen: int) -> EvalResult:
        result = EvalResult(perplexity=math.exp(self.nll / self.count), tokens=self.count, windows=windows,
                            seqlen=seqlen)
        if self.with_reference:
            result.reference_perplexity = math.exp(self.ref_nll / self.count)
            result.kl = self.kl / self.count
            result.top1_agreement = self.agree / self.count
        return result


def teacher_forced_top1(model: torch.nn.Module, ids: list[int]) -> tuple[list[int], list[float]]:
    """Argmax and its log-probability at every position of ``ids`` but the last (one forward)."""
    best = log_probs(model, torch.tensor([ids]))[0].max(dim=-1)
    return best.indices.tolist(), best.values.tolist()


@torch.no_grad()
def evaluate(
    model: Any,
    tokenizer: Any,
    text: str,
    seqlen: int = 512,
    max_tokens: int | None = None,
    reference: Any = None,
    batch_size: int = 1,
    progress: bool = True,
    **stream_options: Any,
) -> EvalResult:
    """Perplexity of ``model`` on ``text``; with ``reference``, also mean KL(reference‖model)
    and top-1 next-token agreement on the same positions (see ``evaluate_windows``)."""
    windows = token_windows(tokenizer, text, seqlen, max_tokens)
    return evaluate_windows(model, windows, reference=reference, batch_size=batch_size, progress=progress,
                            **stream_options)


@torch.no_grad()
def evaluate_windows(
    model: Any,
    windows: torch.Tensor,
    reference: Any = None,
    batch_size: int = 1,
    progress: bool = True,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    max_buffer_bytes: int | None = None,
) -> EvalResult:
    """The figures of ``evaluate`` on token windows [n, seqlen], layer by layer.

    ``model`` and ``reference`` are checkpoints (``ModelRef``, directory, bundled name) or
    in-memory models; each runs through a ``LayerStream``, one layer resident at a time, over
    groups of windows whose hidden states fit in ``max_buffer_bytes`` (default a quarter of the
    available memory). Logits are formed one batch at a time, never for all windows at once.
    """
    from flap_deploy.streaming.layers import LayerStream
    from flap_deploy.streaming.memory import available_memory_bytes
    from flap_deploy.streaming.passes import final_hidden

    streams = [LayerStream.open(m, device=device, dtype=dtype) for m in (model, reference) if m is not None]
    n, seqlen = windows.shape
    per_window = sum(seqlen * s.geometry.hidden_size * torch.empty((), dtype=s.dtype).element_size()
                     for s in streams)
    budget = max_buffer_bytes if max_buffer_bytes is not None else available_memory_bytes() // 4
    group = max(1, min(n, budget // per_window))
    tally = Tally()
    for start in range(0, n, group):
        ids = windows[start:start + group]
        passes = [final_hidden(s, ids, batch_size=batch_size, progress=progress,
                               desc="eval" if i == 0 else "eval reference") for i, s in enumerate(streams)]
        for s in streams:
            s.load_head(lm_head=True)
        try:
            for sl in passes[0].slices:
                logps = [_head_log_probs(s, p.buffer[sl]) for s, p in zip(streams, passes)]
                tally.add(logps[0], ids[sl, 1:], logps[1] if len(logps) > 1 else None)
        finally:
            for s in streams:
                s.release_head()
    return tally.result(n, seqlen)


def _head_log_probs(stream: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 next-token log-probabilities from a batch of last-layer hidden states."""
    lm = stream.model
    logits = lm.lm_head(lm.model.norm(hidden.to(stream.device)))[:, :-1].float()
    return F.log_softmax(logits, dim=-1).cpu()
