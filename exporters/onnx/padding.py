"""Left padding of a batch of prompts: the layout every runtime of the ONNX contract uses.

numpy only, so that the serving engine can use it without importing ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask (int64) of a batch padded on the left."""
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
