"""Export-time check: the ONNX graph against the PyTorch model on fixed prompts.

Prefill plus cached decode steps on a batch of 2 prompts of different lengths (PyTorch
left-pads them; ONNX Runtime runs them through its graph form's row cache), teacher-forced
with PyTorch's greedy tokens so both runtimes always see the same inputs. Reports the largest
|Δlogit| over real (non-padding) positions, the logit range it is judged against, and how
often the two runtimes pick the same greedy token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flap_deploy.generation.generate import left_pad, positions

from .runtime import OnnxCausalLM

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a dark forest, there lived",
)
DECODE_STEPS = 8
# Largest |Δlogit| / logit range that an export may show, per graph dtype; int8 is reported only.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2}


def verification_prompts(tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """Two prompts of different lengths: fixed text, or fixed random ids without a tokenizer."""
    if tokenizer is not None:
        return [list(tokenizer(p)["input_ids"]) for p in PROMPTS]
    rng = np.random.default_rng(1234)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in (9, 5)]


@torch.no_grad()
def compare_with_torch(lm: OnnxCausalLM, model: torch.nn.Module, prompts: list[list[int]],
                       decode_steps: int = DECODE_STEPS, capacity: int | None = None) -> dict[str, Any]:
    """Run both runtimes on prefill + ``decode_steps`` cached steps; return the figures.

    ONNX Runtime runs through the graph form's row cache (``lm.new_cache``), ``capacity`` tokens
    per row (default: the longest prompt plus the decode steps), PyTorch on the left-padded batch.
    """
    n = len(prompts)
    ids, mask = left_pad(prompts, lm.pad_token_id)
    pos = positions(mask)
    real = mask.astype(bool)
    width = ids.shape[1]
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                position_ids=torch.from_numpy(pos), use_cache=True)
    ref, cache = out.logits.float().numpy(), out.past_key_values
    rows = list(range(n))
    kv = lm.new_cache(n, capacity or width + decode_steps)
    prefilled = kv.prefill(rows, prompts, chunk_tokens=n * width, all_logits=True)
    diffs = [max(np.abs(got.astype(np.float32) - ref[r, width - len(got):]).max() for r, got in enumerate(prefilled))]
    got = np.stack([p[-1] for p in prefilled]).astype(np.float32)
    lo, hi = ref[real].min(), ref[real].max()
    matches = total = 0
    finite = all(bool(np.isfinite(p).all()) for p in prefilled)
    for step in range(decode_steps + 1):
        want = ref[:, -1].argmax(-1)
        matches += int((got.argmax(-1) == want).sum())
        total += len(want)
        if step == decode_steps:
            break
        tokens = want[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos), past_key_values=cache, use_cache=True)
        ref, cache = out.logits.float().numpy(), out.past_key_values
        got = kv.decode(rows, want.tolist()).astype(np.float32)
        finite &= bool(np.isfinite(got).all())
        diffs.append(np.abs(got - ref[:, -1]).max())
        lo, hi = min(lo, ref.min()), max(hi, ref.max())
    max_diff = float(max(diffs))
    logit_range = float(hi - lo)
    return {
        "prompt_lengths": [len(p) for p in prompts],
        "batch": n,
        "padding": "left",
        "decode_steps": decode_steps,
        "max_abs_logit_diff": max_diff,
        "logit_range": logit_range,
        "relative_logit_diff": max_diff / logit_range if logit_range > 0 else max_diff,
        "greedy_matches": matches,
        "greedy_total": total,
        "greedy_agreement": matches / total,
        "finite": finite,
    }
