"""The memory plan of a streamed run: what it will hold at its peak, stated and checked before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flap_deploy.errors import ParameterError
from flap_deploy.streaming.layers import LayerStream
from flap_deploy.streaming.memory import GIB, available_memory_bytes, rss_bytes


@dataclass
class MemoryPlan:
    """What a streamed run will hold at its peak, stated before it starts."""

    checkpoint_bytes: int
    largest_layer_bytes: int
    embedding_bytes: int
    buffer_bytes: int
    buffer_device: str
    runtime_bytes: int  # this process before the run (interpreter, torch, tokenizer)
    host_peak_bytes: int
    device_peak_bytes: int
    limit_bytes: int
    covariance_bytes: int = 0  # the ``ls`` refit's full covariances, when held from the statistics pass

    @property
    def buffer_on_host(self) -> bool:
        return self.buffer_device.startswith(("host", "pinned"))

    def describe(self) -> str:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        text = (f"checkpoint {g(self.checkpoint_bytes)}, largest layer {g(self.largest_layer_bytes)}, "
                f"embeddings {g(self.embedding_bytes)}, calibration buffer {g(self.buffer_bytes)} "
                f"(on {self.buffer_device}); "
                + (f"ls covariances {g(self.covariance_bytes)} (from the statistics pass); "
                   if self.covariance_bytes else "")
                + f"expected peak host memory {g(self.host_peak_bytes)} of "
                f"{g(self.limit_bytes)} allowed")
        if self.device_peak_bytes:
            text += f", device memory {g(self.device_peak_bytes)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def plan_memory(stream: LayerStream, tokens: int, *, offload_buffer: bool = False, head: bool = False,
                max_memory: int | None = None, buffers: int = 1) -> MemoryPlan:
    """The peak of a layer-by-layer run over ``tokens`` calibration (or evaluation) tokens, held to ``max_memory``.

    Host peak: what the process holds now, plus ``buffers`` hidden-state buffers when they live
    on the host, plus the larger of the embeddings (with the LM head when ``head``) and two
    layers (the resident one and the next one being read). Raises a ``ParameterError``
    naming the figure and what lowers it when the plan does not fit.
    """
    elt = torch.empty((), dtype=stream.dtype).element_size()
    buffer = buffers * tokens * stream.geometry.hidden_size * elt
    layer = max(stream.layer_nbytes(i) for i in range(stream.geometry.num_layers))
    embed = stream.embedding_nbytes() * (2 if head and not stream.model.config.tie_word_embeddings else 1)
    on_device = stream.device.type != "cpu"
    runtime = rss_bytes()
    if stream.streamed:
        resident = max(embed, 2 * layer)
    else:  # an in-memory model is already counted in the runtime
        resident = 0
    free = torch.cuda.mem_get_info(stream.device)[0] if on_device else 0
    # The buffer lives on the device unless asked otherwise, or unless it does not fit there.
    buffer_on_host = not on_device or offload_buffer or resident + buffer > free
    host = runtime + (0 if on_device else resident) + (buffer if buffer_on_host else 0)
    device = (resident + (0 if buffer_on_host else buffer)) if on_device else 0
    limit = max_memory if max_memory is not None else available_memory_bytes()
    where = str(stream.device)
    if on_device and buffer_on_host:
        where = "pinned host memory" + ("" if offload_buffer else f": it does not fit on {stream.device}")
    elif not on_device:
        where = "host"
    plan = MemoryPlan(stream.checkpoint_nbytes(), layer, stream.embedding_nbytes(), buffer, where, runtime, host,
                      device, limit)
    if host > limit:
        raise ParameterError("max_memory", f"is {limit / GIB:.2f} GiB, and the run needs about {host / GIB:.2f} GiB of "
                                           f"host memory ({plan.describe()}); lower `nsamples` or `seqlen`"
                                           + (", or keep the buffer on the device (`offload_buffer` off)"
                                              if offload_buffer and on_device else ""))
    if on_device:
        if device > free:
            raise ParameterError("max_memory", f"the run needs about {device / GIB:.2f} GiB on {stream.device}, which has "
                                               f"{free / GIB:.2f} GiB free ({plan.describe()}); lower `nsamples` or "
                                               "`seqlen`, or set `offload_buffer`")
    return plan
