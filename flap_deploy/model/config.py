"""The FlapLlama config of a source config with given per-layer widths, and the dense config of a pruned one.
"""

from __future__ import annotations

from typing import Any

from flap_deploy.model.adapters import get_adapter
from flap_deploy.model.layout import LayerWidths
from flap_deploy.model.modeling_flap_llama import FlapLlamaConfig


def flap_config(source_config: Any, widths: list[LayerWidths], *, o_proj_bias: bool, down_proj_bias: bool,
                provenance: dict | None = None) -> FlapLlamaConfig:
    """The FlapLlama config of a source config with the given per-layer widths."""
    adapter = get_adapter(source_config)
    geom = adapter.geometry(source_config)
    fields = {k: v for k, v in source_config.to_dict().items() if k not in _DROPPED_KEYS}
    q = [w.heads for w in widths]
    kv = [w.kv_heads for w in widths]
    mlp = [w.mlp for w in widths]
    fields.update(
        architectures=["FlapLlamaForCausalLM"],
        head_dim=geom.head_dim,
        num_attention_heads_per_layer=q,
        num_key_value_heads_per_layer=kv,
        intermediate_size_per_layer=mlp,
        num_attention_heads=max(max(q), 1),
        num_key_value_heads=max(max(kv), 1),
        intermediate_size=max(max(mlp), 1),
        attention_bias=bool(adapter.qkv_bias(source_config)),
        mlp_bias=bool(adapter.mlp_bias(source_config)),
        o_proj_bias=o_proj_bias,
        down_proj_bias=down_proj_bias,
        qk_norm=adapter.qk_norm,
        sliding_window=adapter.sliding_window(source_config),
    )
    flap = dict(provenance or {})
    flap.setdefault("source_architecture", adapter.architecture)
    flap.setdefault(
        "source_config",
        {
            "num_attention_heads": geom.num_heads,
            "num_key_value_heads": geom.num_kv_heads,
            "intermediate_size": geom.intermediate_size,
            "head_dim": geom.head_dim,
        },
    )
    fields["flap"] = flap
    return FlapLlamaConfig(**fields)


# Source config keys that describe the dense layout or the source runtime, not the model.
_DROPPED_KEYS = {
    "model_type", "architectures", "auto_map", "quantization_config", "layer_types", "use_sliding_window",
    "max_window_layers", "transformers_version", "_name_or_path", "_model_name_or_path", "_attn_implementation",
    "_commit_hash", "torch_dtype",
}


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
    from .layout import LayerWidths

    source = AutoConfig.for_model(**dense_cfg)
    geom = get_adapter(source).geometry(source)
    widths = [LayerWidths(geom.num_heads, geom.num_kv_heads, geom.intermediate_size)] * geom.num_layers
    return flap_config(source, widths, o_proj_bias=False, down_proj_bias=False).to_dict()
