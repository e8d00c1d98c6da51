"""Layer-by-layer passes over a buffer of hidden states: calibration statistics and evaluation.

One decoder layer is resident at a time (``streaming.LayerStream``). The buffer holds the
hidden states of every window [n, seqlen, hidden]; each layer reads it chunk by chunk and
writes its output back in place (windows are independent), while forward pre-hooks stream
the per-channel statistics of the inputs of o_proj and down_proj. The kwargs each layer needs
(rotary embeddings, causal mask, position ids) are captured from the model's own forward, so
every supported family works unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .compress import LayerMask
from .stats import ChannelStats, CovStats
from .memory import rss_bytes
from .streaming import GIB, LayerStream


class _Captured(Exception):
    pass


@dataclass
class LayerStats:
    """Statistics of one layer's o_proj input (attention) and down_proj input (MLP). With
    ``calibrate_layers(covariance=...)`` they are ``stats.CovStats``: a covariance accumulator is
    the channel statistics too (over every channel, whatever columns its co-moment keeps)."""

    attn: ChannelStats
    mlp: ChannelStats

    @property
    def attn_cov(self) -> CovStats | None:
        return self.attn if isinstance(self.attn, CovStats) else None

    @property
    def mlp_cov(self) -> CovStats | None:
        return self.mlp if isinstance(self.mlp, CovStats) else None


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


class LayerPass:
    """The buffer entering layer 0 for ``input_ids``, and running layers over it chunk by chunk."""

    def __init__(self, stream: LayerStream | torch.nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8,
                 buffer_device: torch.device | str | None = None):
        self.stream = stream = as_stream(stream)
        self.slices = _chunks(input_ids.shape[0], batch_size)
        self.tokens = input_ids.numel()
        device = stream.device if buffer_device is None else torch.device(buffer_device)
        pin = device.type == "cpu" and stream.device.type == "cuda"
        n, seqlen = input_ids.shape
        self.buffer = torch.empty(n, seqlen, stream.geometry.hidden_size, dtype=stream.dtype, device=device,
                                  pin_memory=pin)
        self.kwargs_by_size: dict[int, dict[str, Any]] = {}
        self._embed(input_ids)

    @torch.no_grad()
    def _embed(self, input_ids: torch.Tensor) -> None:
        stream = self.stream
        stream.load_head()
        current: dict[str, Any] = {}

        def catch(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            current["hidden"] = args[0] if args else kwargs.pop("hidden_states")
            current["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Captured

        handle = stream.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for sl in self.slices:
                try:
                    stream.model.model(input_ids=input_ids[sl].to(stream.device), use_cache=False)
                except _Captured:
                    pass
                self.buffer[sl] = current["hidden"]
                self.kwargs_by_size.setdefault(sl.stop - sl.start, current["kwargs"])
        finally:
            handle.remove()
            stream.release_head()

    @torch.no_grad()
    def run(self, layer: torch.nn.Module, *, write: bool = True) -> None:
        """``layer`` over every chunk; ``write`` puts its outputs back into the buffer."""
        dev = self.stream.device
        for sl in self.slices:
            out = layer(self.buffer[sl].to(dev, non_blocking=True), **self.kwargs_by_size[sl.stop - sl.start])
            if write:
                self.buffer[sl] = (out[0] if isinstance(out, tuple) else out).to(self.buffer.device)


def as_stream(model: LayerStream | torch.nn.Module) -> LayerStream:
    """A stream as it is; an in-memory model as a stream whose layers are all resident."""
    return model if isinstance(model, LayerStream) else LayerStream.open(model)


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="layer", disable=not progress)


def _postfix(bar: tqdm, phase: str, tokens: int, started: float) -> None:
    rate = tokens / max(time.perf_counter() - started, 1e-9)
    bar.set_postfix_str(f"{phase}, {rate:,.0f} tok/s, RSS {rss_bytes() / GIB:.2f} GiB")


@torch.no_grad()
def calibrate_layers(
    stream: LayerStream | torch.nn.Module,
    input_ids: torch.Tensor,
    on_layer: Callable[[int, LayerStats], LayerMask | None],
    *,
    batch_size: int = 8,
    propagate_pruned: bool = False,
    buffer_device: torch.device | str | None = None,
    progress: bool = True,
    covariance: Callable[[int], tuple[CovStats | None, CovStats | None]] | None = None,
) -> None:
    """Stream each layer's statistics and hand them to ``on_layer(i, stats)`` while the layer is resident.

    Each layer is fed the dense outputs of the previous one (FLAP). With ``propagate_pruned``
    (the Wanda-sp baseline), ``on_layer`` returns the layer's mask and the layer is run again
    with the pruned channels zeroed, so the next layer sees the pruned outputs instead.
    ``covariance(i)`` gives layer i's (o_proj, down_proj) covariance accumulators, fed by the
    same hooks.
    """
    lp = LayerPass(stream, input_ids, batch_size=batch_size, buffer_device=buffer_device)
    stream = lp.stream
    geom = stream.geometry
    started, done = time.perf_counter(), 0
    bar = progress_bar(geom.num_layers, "calibrate", progress)
    for i in range(geom.num_layers):
        _postfix(bar, f"layer {i}: read", done, started)
        with stream.layer(i):
            m = stream.adapter.layer_modules(stream.model, i)
            dev = stream.device
            stats = LayerStats(*(covariance(i) if covariance is not None else
                                 (ChannelStats(m.o_proj.in_features, dev), ChannelStats(m.down_proj.in_features, dev))))
            hooks = [
                m.o_proj.register_forward_pre_hook(lambda mod, args: stats.attn.update(args[0])),
                m.down_proj.register_forward_pre_hook(lambda mod, args: stats.mlp.update(args[0])),
            ]
            _postfix(bar, f"layer {i}: statistics", done, started)
            try:
                lp.run(stream.layers[i], write=not propagate_pruned)  # Wanda-sp: statistics from the dense pass
            finally:
                for h in hooks:
                    h.remove()
            mask = on_layer(i, stats)
            if propagate_pruned and mask is not None:
                keep_attn = mask.heads.to(dev).repeat_interleave(geom.head_dim).to(stream.dtype)
                keep_mlp = mask.mlp.to(dev).to(stream.dtype)
                hooks = [
                    m.o_proj.register_forward_pre_hook(lambda mod, args: (args[0] * keep_attn,)),
                    m.down_proj.register_forward_pre_hook(lambda mod, args: (args[0] * keep_mlp,)),
                ]
                try:
                    lp.run(stream.layers[i])
                finally:
                    for h in hooks:
                        h.remove()
        done += lp.tokens
        bar.update()
    _postfix(bar, "done", done, started)
    bar.close()


@torch.no_grad()
def final_hidden(stream: LayerStream | torch.nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8,
                 buffer_device: torch.device | str | None = None, progress: bool = False,
                 desc: str = "forward") -> LayerPass:
    """Every layer over ``input_ids``, one resident at a time: the buffer then holds the last layer's output."""
    lp = LayerPass(stream, input_ids, batch_size=batch_size, buffer_device=buffer_device)
    stream = lp.stream
    started, done = time.perf_counter(), 0
    bar = progress_bar(stream.geometry.num_layers, desc, progress)
    for i in range(stream.geometry.num_layers):
        with stream.layer(i) as layer:
            lp.run(layer)
        done += lp.tokens
        bar.update()
        _postfix(bar, f"layer {i}", done, started)
    bar.close()
    return lp
