"""Layer-by-layer calibration: run the decoder one layer at a time over the calibration batch.

Peak memory is the model plus one buffer of hidden states [nsamples, seqlen, hidden]: each
layer reads a chunk of the buffer and writes its output back in place (samples are
independent), while forward pre-hooks stream the per-channel statistics of the inputs of
o_proj and down_proj. The kwargs each layer needs (rotary embeddings, causal mask, position
ids) are captured from the model's own forward, so every supported family works unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .adapters import get_adapter
from .compress import LayerMask
from .stats import ChannelStats, CovStats


class _Captured(Exception):
    pass


@dataclass
class LayerStats:
    """Statistics of one layer's o_proj input (attention) and down_proj input (MLP); with
    ``calibrate_layers(covariance=...)`` also their covariances (``stats.CovStats``)."""

    attn: ChannelStats
    mlp: ChannelStats
    attn_cov: CovStats | None = None
    mlp_cov: CovStats | None = None

    def update_attn(self, x: torch.Tensor) -> None:
        for s in (self.attn, self.attn_cov):
            if s is not None:
                s.update(x)

    def update_mlp(self, x: torch.Tensor) -> None:
        for s in (self.mlp, self.mlp_cov):
            if s is not None:
                s.update(x)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


@torch.no_grad()
def embed_inputs(model: torch.nn.Module, input_ids: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Hidden states entering layer 0 for all windows, and the layer kwargs per chunk size."""
    layers = get_adapter(model.config).layers(model)
    device = next(model.parameters()).device
    n, seqlen = input_ids.shape
    buffer = torch.empty(n, seqlen, model.config.hidden_size, dtype=next(model.parameters()).dtype, device=device)
    kwargs_by_size: dict[int, dict[str, Any]] = {}
    current: dict[str, Any] = {}

    def catch(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        current["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        current["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Captured

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for sl in _chunks(n, batch_size):
            try:
                model.model(input_ids=input_ids[sl].to(device), use_cache=False)
            except _Captured:
                pass
            buffer[sl] = current["hidden"]
            kwargs_by_size.setdefault(sl.stop - sl.start, current["kwargs"])
    finally:
        handle.remove()
    return buffer, kwargs_by_size


def _layer_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def calibrate_layers(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    on_layer: Callable[[int, LayerStats], LayerMask | None],
    *,
    batch_size: int = 8,
    propagate_pruned: bool = False,
    progress: bool = True,
    covariance: Callable[[int], tuple[CovStats | None, CovStats | None]] | None = None,
) -> None:
    """Stream each layer's statistics and hand them to ``on_layer(i, stats)``.

    Each layer is fed the dense outputs of the previous one (FLAP). With ``propagate_pruned``
    (the Wanda-sp baseline), ``on_layer`` returns the layer's mask and the layer is run again
    with the pruned channels zeroed, so the next layer sees the pruned outputs instead.
    ``covariance(i)`` gives layer i's (o_proj, down_proj) covariance accumulators, fed by the
    same hooks (the reconstruction pass).
    """
    adapter = get_adapter(model.config)
    geom = adapter.geometry(model.config)
    buffer, kwargs_by_size = embed_inputs(model, input_ids, batch_size)
    slices = _chunks(input_ids.shape[0], batch_size)
    device = buffer.device

    def run(layer: torch.nn.Module) -> None:
        for sl in slices:
            buffer[sl] = _layer_out(layer(buffer[sl], **kwargs_by_size[sl.stop - sl.start]))

    for i in tqdm(range(geom.num_layers), desc="calibrate", unit="layer", disable=not progress):
        layer = adapter.layers(model)[i]
        m = adapter.layer_modules(model, i)
        stats = LayerStats(ChannelStats(m.o_proj.in_features, device), ChannelStats(m.down_proj.in_features, device),
                           *(covariance(i) if covariance is not None else ()))
        hooks = [
            m.o_proj.register_forward_pre_hook(lambda mod, args: stats.update_attn(args[0])),
            m.down_proj.register_forward_pre_hook(lambda mod, args: stats.update_mlp(args[0])),
        ]
        try:
            if propagate_pruned:  # statistics from a dense pass, outputs from the pruned layer
                for sl in slices:
                    layer(buffer[sl], **kwargs_by_size[sl.stop - sl.start])
            else:
                run(layer)
        finally:
            for h in hooks:
                h.remove()
        mask = on_layer(i, stats)
        if propagate_pruned and mask is not None:
            keep_attn = mask.heads.to(device).repeat_interleave(geom.head_dim).to(buffer.dtype)
            keep_mlp = mask.mlp.to(device).to(buffer.dtype)
            hooks = [
                m.o_proj.register_forward_pre_hook(lambda mod, args: (args[0] * keep_attn,)),
                m.down_proj.register_forward_pre_hook(lambda mod, args: (args[0] * keep_mlp,)),
            ]
            try:
                run(layer)
            finally:
                for h in hooks:
                    h.remove()
