"""Text generation: the one generation loop every runtime runs, and PyTorch's step for it.

``decode`` is the loop: the prompts go into the rows of a runtime's KV cache (``Rows``: prefill,
then one token a step for the rows still running, release when a row ends), tokens chosen by
``sampling.next_token`` (row ``r`` seeded ``seed + r``), EOS / stop tokens / stop strings /
``max_tokens`` / the runtime's ``max_length`` as ``SamplingParams`` says. ``LeftPadded`` gives a
runtime whose step runs a left-padded batch (``left_pad``, ``positions``) those rows. ``generate``
runs a checkpoint directory (pruned FlapLlama or a dense checkpoint of a supported family, or a
bundled model name) on PyTorch through it; ONNX Runtime generation (``exporters.onnx.runtime``) is
the same loop over its graph's row cache, so one seed gives the same tokens on both where their
logits agree. Module level is numpy only; torch is imported when generating.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from flap_deploy.errors import ParameterError
from flap_deploy.generation.sampling import SamplingParams, find_stop, next_token

if TYPE_CHECKING:
    from flap_deploy.io.model_ref import ModelRef

# (input_ids of the new tokens, attention_mask of past and new, their position_ids) -> the logits of the
# last position [batch, vocab]; the step keeps the KV cache between calls.
Step = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class Rows(Protocol):
    """A runtime's KV cache as rows, one sequence each (``exporters.onnx.batch.RowCache``, ``LeftPadded``)."""

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], chunk_tokens: int) -> list[np.ndarray]:
        """Each prompt into its row; the next-token logits of each."""

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        """One token appended to each of these rows; their next-token logits [len(rows), vocab]."""

    def release(self, rows: Sequence[int]) -> None:
        """These rows' sequences have ended."""


@dataclass
class Generation:
    """What generation returns for one prompt, on any runtime."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "length" | "stop" (EOS, a stop token or a stop string)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (int64) of a batch padded on the left: the layout every runtime uses."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for r, p in enumerate(prompts):
        if len(p):
            ids[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """position_ids for a left-padded mask: 0 at each row's first real token."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of one text prompt; ``chat`` wraps it in the tokenizer's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ParameterError("chat", "needs a chat template, and the tokenizer has none")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer(prompt)["input_ids"])


class LeftPadded:
    """``Rows`` over a ``Step`` that runs one left-padded batch: one prefill, of rows 0 .. n-1 (as
    ``decode`` makes it), then every row takes every step (a row that has ended is fed padding, its
    logits unused), so ``release`` frees nothing."""

    def __init__(self, step: Step, pad_id: int):
        self.step, self.pad_id = step, pad_id

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], chunk_tokens: int = 0) -> list[np.ndarray]:
        if list(rows) != list(range(len(prompts))):
            raise ValueError("a left-padded batch is prefilled once, rows 0 .. n-1 in order")
        ids, self.mask = left_pad(prompts, self.pad_id)
        self.pos = positions(self.mask)
        return list(self.step(ids, self.mask, self.pos))

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        n = len(self.mask)
        ids = np.full((n, 1), self.pad_id, dtype=np.int64)
        ids[list(rows), 0] = tokens
        self.mask = np.concatenate([self.mask, np.ones((n, 1), dtype=np.int64)], axis=1)
        self.pos = self.pos[:, -1:] + 1
        return self.step(ids, self.mask, self.pos)[list(rows)]

    def release(self, rows: Sequence[int]) -> None:
        pass


def decode(cache: Rows, prompts: Sequence[Sequence[int]], params: SamplingParams, *, eos: Sequence[int],
           detokenize: Callable[[list[int]], str | None], max_length: int | None = None,
           chunk_tokens: int = 4096) -> list[Generation]:
    """One Generation per prompt (token ids), row ``r`` of ``cache`` each: the generation loop of every runtime.

    Temperature 0 is greedy; otherwise tokens are sampled with top-k / top-p, row ``r`` using seed
    ``seed + r`` when a seed is given. A row ends at one of ``eos`` or a stop token (unless
    ``ignore_eos``; not before ``min_tokens``), at a stop string (``detokenize``'s text is cut
    before it), after ``max_tokens``, or when prompt and generated tokens reach ``max_length``
    (the last token is never cached, so a cache of ``max_length - 1`` holds the row).
    A row leaves the cache (``release``) as it ends; the rest go on. Prefill runs in graph calls of
    at most ``chunk_tokens`` padded tokens where the cache chunks.
    """
    n = len(prompts)
    rngs = [np.random.default_rng(None if params.seed is None else params.seed + r) for r in range(n)]
    ends = set() if params.ignore_eos else set(eos) | set(params.stop_token_ids)
    new: list[list[int]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    texts: list[str | None] = [None] * n
    live = list(range(n))
    last = dict(zip(live, cache.prefill(live, prompts, chunk_tokens)))
    while True:
        for r in live:
            banned = sorted(ends) if len(new[r]) < params.min_tokens else ()
            tok = next_token(last[r], params, rngs[r], banned=banned)
            new[r].append(tok)
            if tok in ends:
                reasons[r] = "stop"
            elif params.stop:
                text = detokenize(new[r])
                cut = find_stop(text, params.stop)
                if cut is not None:
                    reasons[r], texts[r] = "stop", text[:cut]
            full = max_length is not None and len(prompts[r]) + len(new[r]) >= max_length
            if reasons[r] is None and (len(new[r]) >= params.max_tokens or full):
                reasons[r] = "length"
        cache.release([r for r in live if reasons[r] is not None])
        live = [r for r in live if reasons[r] is None]
        if not live:
            break
        last = dict(zip(live, cache.decode(live, [new[r][-1] for r in live])))
    return [Generation(list(prompts[r]), new[r],
                       texts[r] if texts[r] is not None else detokenize([t for t in new[r] if t not in ends]),
                       reasons[r] or "length") for r in range(n)]


def generate(model: str | os.PathLike | ModelRef, prompts: Sequence[str], params: SamplingParams,
             threads: int | None = None, chat: bool = False, device: str | None = "auto") -> list[Generation]:
    """One Generation per text prompt, from a checkpoint directory on PyTorch: ``decode`` over the
    model's forward with its KV cache; ``device`` as in ``streaming.resolve_device``."""
    import torch
    from transformers.utils import logging as hf_logging

    from flap_deploy.io.model_ref import CHECKPOINTS, resolve_model
    from flap_deploy.streaming.layers import resolve_device

    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # keep stdout/stderr to the generated text
    dev = resolve_device(device)
    ref = resolve_model(model, accept=CHECKPOINTS)
    model, tokenizer = ref.load().to(dev), ref.tokenizer()
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    cache: dict[str, Any] = {"past": None}

    @torch.no_grad()
    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        out = model(input_ids=torch.from_numpy(ids).to(dev), attention_mask=torch.from_numpy(mask).to(dev),
                    position_ids=torch.from_numpy(pos).to(dev), past_key_values=cache["past"], use_cache=True,
                    logits_to_keep=1)
        cache["past"] = out.past_key_values
        return out.logits[:, -1].float().cpu().numpy()

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    return decode(LeftPadded(step, pad_id), [encode_prompt(tokenizer, p, chat) for p in prompts], params, eos=eos,
                  detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
