"""The ONNX I/O contract (ARCHITECTURE.md) in plain numpy: graph forms, names, positions, cache hand-over.

Every runtime of the contract (``OnnxCausalLM``, the serving engine, the export check) uses
these; nothing here needs ONNX Runtime or torch, so the serving engine imports it without
either. An export has one of two graph forms (``FORMS``, the manifest's ``attention``):
``past-present`` takes a left-padded batch (``flap_deploy.generation.generate.left_pad``, as
PyTorch) and returns each step's cache grown by the new tokens; ``gqa`` updates a KV buffer of
fixed capacity in place, one sequence per buffer row, its tokens from position 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
# Last input (exports since graph 2): the positions along the seq axis whose logits the graph
# computes; logits are then [batch, kept, vocab]. Prefill asks for the last position only,
# evaluation for all. past-present: int64 [kept], the same positions for every row (older graphs
# lack it and return all positions); gqa: int64 [batch, kept], per row (chunks are right-padded).
LOGITS_INDEX = "logits_index"
# The gqa form's per-call inputs: the cache length of each row after the call minus one, the
# number of new (not padding) tokens of each row (0: the row sits the call out), and an upper
# bound of the cache length (the buffer's capacity).
SEQLENS_K, QUERY_SEQLENS, TOTAL_SEQUENCE_LENGTH = "seqlens_k", "query_seqlens", "total_sequence_length"


@dataclass(frozen=True)
class GraphForm:
    """One graph form: what it is, its inputs before the cache tensors, its cache layout (the manifest's)."""

    summary: str
    step_inputs: tuple[str, ...]
    cache_layout: str
    version: int | str  # of the graph this exporter writes; in ensure_onnx's cache key, so a change re-exports


# The graph forms, by the manifest's "attention" value; exports made before it existed are past-present.
PAST_PRESENT, GQA = "past-present", "gqa"
FORMS = {
    GQA: GraphForm("one com.microsoft.GroupQueryAttention node per layer over a KV buffer of up to max_length "
                   "tokens per row, shared between past and present (updated in place), fused rotary and "
                   "RMSNorm; ONNX Runtime only",
                   ("input_ids", SEQLENS_K, QUERY_SEQLENS, TOTAL_SEQUENCE_LENGTH),
                   "past_key_values.{i}.key|value and present.{i}.key|value are one buffer [batch, kv_heads_i, "
                   "capacity, head_dim] per attention layer i (capacity <= max_length, chosen by the caller), bound "
                   "as both input and output; row b holds its sequence's tokens at positions 0..seqlens_k[b]; a call "
                   "writes the new tokens at positions seqlens_k[b] + 1 - query_seqlens[b].. in place",
                   "gqa-1"),
    PAST_PRESENT: GraphForm("explicit attention (MatMul / Softmax); each step's present K/V is the past plus the "
                            "new tokens (Optimum-style), any ONNX runtime",
                            ("input_ids", "attention_mask", "position_ids"),
                            "past_key_values.{i}.key|value [batch, kv_heads_i, past, head_dim] per attention layer "
                            "i; present.{i}.key|value [batch, kv_heads_i, past + seq, head_dim], a new tensor each "
                            "call; padding (left) masked by attention_mask",
                            2),
}
DEFAULT_FORM = GQA
# ONNX Runtime's CPU GroupQueryAttention kernel refuses other head sizes.
GQA_HEAD_DIM_MULTIPLE = 16

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


def form_of(manifest: dict[str, Any]) -> str:
    """The graph form of an export's manifest."""
    return manifest.get("attention", PAST_PRESENT)


def gqa_unsupported(head_dim: int) -> str | None:
    """Why the gqa form cannot hold a model with this head size, or None."""
    if head_dim % GQA_HEAD_DIM_MULTIPLE:
        return (f"needs head_dim a multiple of {GQA_HEAD_DIM_MULTIPLE} (ONNX Runtime's GroupQueryAttention), "
                f"the model has {head_dim}")
    return None


def input_names(layers: list[CacheLayer], form: str = PAST_PRESENT) -> list[str]:
    names = list(FORMS[form].step_inputs)
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
