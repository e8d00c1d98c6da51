"""Parameter counting: the cost model of pruning and the figures of reports."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .checkpoint import expected_tensor_shapes


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


def dense_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config of a pruned checkpoint's dense source (uniform widths, no compensation biases)."""
    src = (cfg.get("flap") or {}).get("source_config") or {}
    n = cfg["num_hidden_layers"]
    heads = src.get("num_attention_heads", cfg["num_attention_heads"])
    kv = src.get("num_key_value_heads", cfg["num_key_value_heads"])
    inter = src.get("intermediate_size", cfg["intermediate_size"])
    dense = dict(cfg)
    dense.update(
        num_attention_heads_per_layer=[heads] * n,
        num_key_value_heads_per_layer=[kv] * n,
        intermediate_size_per_layer=[inter] * n,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        o_proj_bias=bool(src.get("o_proj_bias", False)),
        down_proj_bias=bool(src.get("down_proj_bias", False)),
    )
    return dense


def as_flap_config(dense_cfg: dict[str, Any]) -> dict[str, Any]:
    """A dense source config.json written as an unpruned FlapLlama config (for counting and reports)."""
    from transformers import AutoConfig

    from .adapters import get_adapter
    from .compress import LayerWidths, flap_config

    source = AutoConfig.for_model(**dense_cfg)
    geom = get_adapter(source).geometry(source)
    widths = [LayerWidths(geom.num_heads, geom.num_kv_heads, geom.intermediate_size)] * geom.num_layers
    return flap_config(source, widths, o_proj_bias=False, down_proj_bias=False).to_dict()
