"""A fixed-recipe ~20 % structured pruning of a Llama-family model, for ONNX tests and benchmarks.

Stand-in for the FLAP pruner (``flap_deploy.prune``): a FLAP-style fluctuation score
(variance of each o_proj / down_proj input channel x squared norm of its weight column)
over a few fixed sentences picks, in every other layer, the weakest KV group to drop and,
in every layer, the weakest MLP channels; the calibration means compensate through
biases. The masks go through ``flap_deploy.compress.compress`` like any pruner's would.
"""

from __future__ import annotations

import torch

from flap_deploy.adapters import get_adapter
from flap_deploy.compress import LayerMask, LayerMeans, compress

CALIBRATION = (
    "The history of the city goes back to the Roman period, when a small fort was built by the river.",
    "Photosynthesis converts light energy into chemical energy stored in sugars.",
    "In 1969, astronauts landed on the Moon for the first time and returned safely to Earth.",
    "The recipe calls for two cups of flour, one egg, a pinch of salt and a little milk.",
    "Machine learning models are trained on data and evaluated on examples they have not seen.",
    "The orchestra played the symphony with great energy, and the audience applauded for minutes.",
    "Rivers carry sediment from the mountains to the sea, building deltas over thousands of years.",
    "She opened the old letter carefully and read it twice before saying anything.",
)


@torch.no_grad()
def fixed_prune(model: torch.nn.Module, tokenizer, mlp_keep: float = 0.8, drop_kv_every: int = 2,
                align: int = 16) -> torch.nn.Module:
    """A FlapLlama with one KV group removed in every ``drop_kv_every``-th layer and ``1 - mlp_keep``
    of each layer's MLP channels removed (kept count rounded to ``align``), with bias compensation."""
    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)
    stats: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for i in range(geom.num_layers):
        m = adapter.layer_modules(model, i)
        for kind, proj in (("attn", m.o_proj), ("mlp", m.down_proj)):
            def hook(_mod, args, _out, key=(i, kind)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                s = stats.setdefault(key, [torch.zeros(x.shape[1], dtype=torch.float64)] * 2 + [0])
                stats[key] = [s[0] + x.sum(0), s[1] + (x * x).sum(0), s[2] + x.shape[0]]
            hooks.append(proj.register_forward_hook(hook))
    try:
        for text in CALIBRATION:
            model(**tokenizer(text, return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()

    masks, means = [], []
    keep = max(align, int(round(geom.intermediate_size * mlp_keep / align)) * align)
    for i in range(geom.num_layers):
        m = adapter.layer_modules(model, i)
        layer_means = {}
        scores = {}
        for kind, proj in (("attn", m.o_proj), ("mlp", m.down_proj)):
            total, sq, n = stats[(i, kind)]
            mean = total / n
            var = sq / n - mean * mean
            layer_means[kind] = mean.float()
            scores[kind] = var * proj.weight.double().pow(2).sum(0)
        heads = torch.ones(geom.num_heads, dtype=torch.bool)
        if drop_kv_every and i % drop_kv_every == 0 and geom.num_kv_heads > 1:
            per_group = scores["attn"].view(geom.num_kv_heads, -1).sum(1)
            g = int(per_group.argmin())
            heads.view(geom.num_kv_heads, geom.group_size)[g] = False
        mlp = torch.zeros(geom.intermediate_size, dtype=torch.bool)
        mlp[scores["mlp"].topk(keep).indices] = True
        masks.append(LayerMask(heads=heads, mlp=mlp))
        means.append(LayerMeans(attn=layer_means["attn"], mlp=layer_means["mlp"]))
    return compress(model, masks, means, provenance={"method": "fixed-recipe (benchmarks/fixed_prune.py)",
                                                    "mlp_keep": mlp_keep, "drop_kv_every": drop_kv_every})


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of every matmul weight read per decoded token (decoder projections and lm_head)."""
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
