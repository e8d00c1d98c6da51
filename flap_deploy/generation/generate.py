"""Text generation on PyTorch (transformers), and what every runtime's generation shares.

``generate`` runs a checkpoint directory (pruned FlapLlama or a dense checkpoint of a
supported family, or a bundled model name) with ``SamplingParams``. ONNX Runtime
generation (``exporters.onnx.runtime``) takes the same parameters and returns the same
``Generation`` records; both left-pad a batch with ``left_pad`` and encode prompts with
``encode_prompt``. Module level is numpy only; torch is imported when generating.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from flap_deploy.errors import ParameterError
from flap_deploy.generation.sampling import SamplingParams, find_stop

if TYPE_CHECKING:
    from flap_deploy.io.model_ref import ModelRef


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


def encode_prompt(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of one text prompt; ``chat`` wraps it in the tokenizer's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ParameterError("chat", "needs a chat template, and the tokenizer has none")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer(prompt)["input_ids"])


def generate(model: str | os.PathLike | ModelRef, prompts: Sequence[str], params: SamplingParams,
             threads: int | None = None, chat: bool = False, device: str | None = "auto") -> list[Generation]:
    """One Generation per text prompt, from a checkpoint directory on PyTorch (the batch left-padded);
    ``device`` as in ``streaming.resolve_device``."""
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
    batch = [encode_prompt(tokenizer, p, chat) for p in prompts]
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    eos += [t for t in params.stop_token_ids if t not in eos]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    ids, mask = left_pad(batch, pad)
    kwargs = dict(max_new_tokens=params.max_tokens, pad_token_id=pad)
    if params.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        if params.seed is not None:
            torch.manual_seed(params.seed)
    if params.ignore_eos:
        kwargs.update(eos_token_id=None, min_new_tokens=params.max_tokens)
    else:
        if params.stop_token_ids:
            kwargs.update(eos_token_id=eos)
        if params.min_tokens:
            kwargs.update(min_new_tokens=params.min_tokens)
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids).to(dev), attention_mask=torch.from_numpy(mask).to(dev), **kwargs)
    results = []
    for r, prompt in enumerate(batch):
        new = out[r, ids.shape[1]:].tolist()
        reason = "length"
        for i, t in enumerate(new):
            if t in eos and not params.ignore_eos:
                new, reason = new[: i + 1], "stop"
                break
        text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
        cut = find_stop(text, params.stop) if params.stop else None
        if cut is not None:
            text, reason = text[:cut], "stop"
        results.append(Generation(prompt, new, text, reason))
    return results
