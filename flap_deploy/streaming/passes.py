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
from typing import Any

import torch
from tqdm.auto import tqdm

from flap_deploy.streaming.layers import LayerStream, hooks
from flap_deploy.streaming.memory import GIB, rss_bytes


class _Captured(Exception):
    pass


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

        try:
            with hooks((stream.layers[0], catch), with_kwargs=True):
                for sl in self.slices:
                    try:
                        stream.model.model(input_ids=input_ids[sl].to(stream.device), use_cache=False)
                    except _Captured:
                        pass
                    self.buffer[sl] = current["hidden"]
                    self.kwargs_by_size.setdefault(sl.stop - sl.start, current["kwargs"])
        finally:
            stream.release_head()

    @torch.no_grad()
    def forward(self, layer: torch.nn.Module, sl: slice, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """``layer``'s output for the windows ``sl`` of ``buffer`` (default the pass's own)."""
        buffer = self.buffer if buffer is None else buffer
        out = layer(buffer[sl].to(self.stream.device, non_blocking=True), **self.kwargs_by_size[sl.stop - sl.start])
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def run(self, layer: torch.nn.Module, *, write: bool = True, buffer: torch.Tensor | None = None) -> None:
        """``layer`` over every chunk of ``buffer`` (default the pass's own, or hidden states of the same windows
        held elsewhere, e.g. one per candidate of a width search); ``write`` puts its outputs back."""
        buffer = self.buffer if buffer is None else buffer
        for sl in self.slices:
            out = self.forward(layer, sl, buffer)
            if write:
                buffer[sl] = out.to(buffer.device)


def as_stream(model: LayerStream | torch.nn.Module) -> LayerStream:
    """A stream as it is; an in-memory model as a stream whose layers are all resident."""
    return model if isinstance(model, LayerStream) else LayerStream.open(model)


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="layer", disable=not progress)


def show_rate(bar: tqdm, phase: str, tokens: int, started: float) -> None:
    rate = tokens / max(time.perf_counter() - started, 1e-9)
    bar.set_postfix_str(f"{phase}, {rate:,.0f} tok/s, RSS {rss_bytes() / GIB:.2f} GiB")


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
        show_rate(bar, f"layer {i}", done, started)
    bar.close()
    return lp
