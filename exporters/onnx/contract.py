"""The ONNX I/O contract (ARCHITECTURE.md) in plain numpy: names, logits positions, cache hand-over.

Every runtime of the contract (``OnnxCausalLM``, the serving engine, the export check) uses
these; nothing here needs ONNX Runtime or torch, so the serving engine imports it without
either. The batch is left-padded with ``flap_deploy.generation.generate.left_pad`` and numbered with its
``positions`` (PyTorch uses them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# Optional last input (exports since flap-deploy 0.x graph 2): int64 [kept] positions along the
# seq axis whose logits the graph computes; logits are then [batch, kept, vocab]. Prefill asks
# for the last position only, evaluation for all. Older graphs lack it and return all positions.
LOGITS_INDEX = "logits_index"
# Bumped when the exported graph changes, so that cached exports (ensure_onnx) are redone.
GRAPH_VERSION = 2


@dataclass(frozen=True)
class CacheLayer:
    """One attention layer's cache slot in the graph."""

    layer: int  # index in the decoder stack (names use it)
    kv_heads: int
    head_dim: int

    @property
    def past_names(self) -> tuple[str, str]:
        return f"{PAST_PREFIX}{self.layer}.key", f"{PAST_PREFIX}{self.layer}.value"

    @property
    def present_names(self) -> tuple[str, str]:
        return f"{PRESENT_PREFIX}{self.layer}.key", f"{PRESENT_PREFIX}{self.layer}.value"


def cache_layers(config: Any) -> list[CacheLayer]:
    """The attention layers of a FlapLlama config, in stack order."""
    return [
        CacheLayer(i, kv, config.head_dim)
        for i, kv in enumerate(config.num_key_value_heads_per_layer)
        if config.num_attention_heads_per_layer[i] > 0
    ]


def input_names(layers: list[CacheLayer]) -> list[str]:
    names = ["input_ids", "attention_mask", "position_ids"]
    for c in layers:
        names.extend(c.past_names)
    return names + [LOGITS_INDEX]


def output_names(layers: list[CacheLayer]) -> list[str]:
    names = ["logits"]
    for c in layers:
        names.extend(c.present_names)
    return names


def past_from_present(present: dict[str, Any]) -> dict[str, Any]:
    """Rename ``present.{i}.key|value`` to ``past_key_values.{i}.key|value`` for the next step."""
    return {(PAST_PREFIX + k[len(PRESENT_PREFIX):]) if k.startswith(PRESENT_PREFIX) else k: v
            for k, v in present.items()}


def logits_index(seq: int, last_only: bool) -> np.ndarray:
    """The ``logits_index`` input: the last position, or every position of a ``seq``-token call."""
    return np.asarray([seq - 1] if last_only else range(seq), dtype=np.int64)
