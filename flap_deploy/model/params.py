"""Parameter counting: the cost model of pruning and the figures of reports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flap_deploy.model.config import as_flap_config
from flap_deploy.model.contract import expected_tensor_shapes


def layer_linear_params(hidden: int, head_dim: int, heads: int, kv_heads: int, intermediate: int) -> int:
    """Weights of one decoder layer's q/k/v/o and gate/up/down projections (biases excluded)."""
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate


@dataclass(frozen=True)
class ParamCounts:
    total: int
    decoder: int  # everything inside model.layers (linear weights, biases, norms)
    decoder_linear: int  # q/k/v/o and gate/up/down weights: what the pruning ratio is measured on


def count_params(cfg: dict[str, Any]) -> ParamCounts:
    """Counts of a pruned-checkpoint config (tied embeddings counted once)."""
    shapes = expected_tensor_shapes(cfg)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    decoder = sum(v for k, v in sizes.items() if k.startswith("model.layers."))
    linear = sum(v for k, v in sizes.items() if k.startswith("model.layers.") and k.endswith("_proj.weight"))
    return ParamCounts(total=sum(sizes.values()), decoder=decoder, decoder_linear=linear)


def decode_step_params(cfg: dict[str, Any]) -> int:
    """Weights read once per decode step: decoder layers, final norm and lm_head.

    The input embedding is a row lookup, negligible; with tied embeddings the matrix is read
    as the lm_head. Takes a pruned config.json dict or a dense one of a supported family.
    """
    flap = cfg if cfg.get("model_type") == "flap_llama" else as_flap_config(cfg)
    counts = count_params(flap)
    embedding = 0 if flap.get("tie_word_embeddings", False) else flap["vocab_size"] * flap["hidden_size"]
    return counts.total - embedding


def quantized_weight_bits(cfg: dict[str, Any]) -> int | None:
    """Bits per decoder linear weight of a compressed-tensors ``quantization_config`` (None: not quantized)."""
    groups = ((cfg.get("quantization_config") or {}).get("config_groups") or {}).values()
    bits = {(g.get("weights") or {}).get("num_bits") for g in groups} - {None}
    return max(bits) if bits else None


def decode_step_bytes(cfg: dict[str, Any], element_bytes: int) -> int:
    """Weight bytes read per decode step when the runtime holds unquantized weights in ``element_bytes``
    (2 for bf16 / fp16, 4 for fp32): the decoder linear weights of a quantized checkpoint count at
    their stored width (the LM head, norms and biases stay at the runtime's; per-channel scales,
    one per output row, are left out as negligible)."""
    params = decode_step_params(cfg)
    bits = quantized_weight_bits(cfg)
    if bits is None:
        return params * element_bytes
    flap = cfg if cfg.get("model_type") == "flap_llama" else as_flap_config(cfg)
    linear = count_params(flap).decoder_linear
    return (params - linear) * element_bytes + linear * bits // 8




def kv_bytes_per_token(cfg: dict[str, Any], element_bytes: int) -> int:
    """KV-cache bytes one token holds across all layers: the sum over layers of 2 (key and value) ×
    KV heads × head_dim × ``element_bytes`` (2 for a bf16 / fp16 cache). Takes a pruned config.json
    (per-layer KV heads; 0 where attention was removed), a dense one, or an ONNX manifest."""
    layers = cfg["num_hidden_layers"]
    kv = cfg.get("num_key_value_heads_per_layer") or \
        [cfg.get("num_key_value_heads") or cfg["num_attention_heads"]] * layers
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return sum(2 * heads * head_dim * element_bytes for heads in kv)
