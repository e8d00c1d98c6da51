"""The pruned checkpoint's tensors: every name and shape a flap_llama config implies (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Any


def expected_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a pruned checkpoint must hold, with its shape (lm_head only if untied)."""
    hidden, hd, vocab = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    qkv_bias, mlp_bias = cfg.get("attention_bias", False), cfg.get("mlp_bias", False)
    for i, (q, kv, inter) in enumerate(zip(cfg["num_attention_heads_per_layer"], cfg["num_key_value_heads_per_layer"],
                                           cfg["intermediate_size_per_layer"])):
        p = f"model.layers.{i}."
        if q:
            shapes[p + "input_layernorm.weight"] = (hidden,)
            for name, rows in (("q_proj", q * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
                shapes[p + f"self_attn.{name}.weight"] = (rows, hidden)
                if qkv_bias:
                    shapes[p + f"self_attn.{name}.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (hidden, q * hd)
            if cfg.get("qk_norm", False):
                shapes[p + "self_attn.q_norm.weight"] = (hd,)
                shapes[p + "self_attn.k_norm.weight"] = (hd,)
        if cfg.get("o_proj_bias", False):
            shapes[p + "self_attn.o_proj.bias"] = (hidden,)
        if inter:
            shapes[p + "post_attention_layernorm.weight"] = (hidden,)
            for name in ("gate_proj", "up_proj"):
                shapes[p + f"mlp.{name}.weight"] = (inter, hidden)
                if mlp_bias:
                    shapes[p + f"mlp.{name}.bias"] = (inter,)
            shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        if cfg.get("down_proj_bias", False):
            shapes[p + "mlp.down_proj.bias"] = (hidden,)
    return shapes
