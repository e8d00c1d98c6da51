"""Tensor-parallel shardability of one decoder layer: the one copy of vLLM's per-layer TP rule.

vLLM shards q/k/v and o by heads, gate/up and down by MLP channels, over ``tp_size`` ranks T:
query heads divisible by T, KV heads divisible by T or dividing T (KV heads are then
replicated), MLP width divisible by T. A layer without attention (0 heads) or without an MLP
(width 0) has nothing to shard there. Pruning (``allocation.Alignment``), the vLLM export
check and the vLLM launcher all ask this function.
"""

from __future__ import annotations


def layer_tp_problem(heads: int, kv_heads: int, mlp: int, tp_size: int) -> str | None:
    """Why one layer (``heads`` query / ``kv_heads`` KV heads, MLP width ``mlp``) cannot be
    sharded over ``tp_size`` ranks, or None."""
    if heads:
        if heads % tp_size:
            return f"{heads} query heads are not divisible by tensor-parallel size {tp_size}"
        if kv_heads % tp_size and tp_size % kv_heads:
            return f"{kv_heads} KV heads neither divide nor are divisible by tensor-parallel size {tp_size}"
    if mlp % tp_size:
        return f"MLP width {mlp} is not divisible by tensor-parallel size {tp_size}"
    return None
