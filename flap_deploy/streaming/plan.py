"""The memory plan of a streamed prune: every term it holds, where, and when, stated and checked before
the first layer runs.

A term is a named field of ``MemoryPlan`` (bytes), each computed in one place: the streaming terms in
``plan_memory`` below, the statistics and the ``ls`` refit's in ``pruning.statistics.plan_statistics``
(from ``stats.CovStats`` and ``reconstruct.refit_nbytes``). A phase is the set of terms resident
together (``MemoryPlan.phases``); the peak is the largest phase's sum, on the host and, for an
accelerator, on the device. Where a size is not known when the plan is made (the widths the
allocation will keep), it is bounded (by the dense widths), and the code keeps to the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from flap_deploy.errors import ParameterError
from flap_deploy.streaming.layers import LayerStream
from flap_deploy.streaming.memory import GIB, available_memory_bytes, rss_bytes

# Bytes per channel and token of the statistics hooks' transients: the float64 copy of a batch, its
# centred copy, and their square (``ChannelStats.update``) or the float32 product inputs (``CovStats``).
HOOK_BYTES = 25
# What the process holds beyond the live tensors the terms count: code and data pages of torch (LAPACK,
# kernels of the first forward) and Python objects touched after the plan measures the runtime, and
# glibc's arenas for allocations under 1 MiB (larger ones get their own pages, returned when freed:
# ``memory.map_large_allocations``). 96 MiB covered the excess measured on the bundled model and on the
# 3 GB test checkpoint, whose peaks stay 2.5-3.5 % under the plan (docs/pruning.md).
SLACK_BYTES = 96 * 2**20
# Terms that live where the layers run (the rest, and all of a CPU run, on the host).
_DEVICE_TERMS = frozenset({"layer", "layer_copy", "embedding", "head", "generation", "held", "activation",
                           "accumulator", "update"})
_LABELS = {
    "runtime": "this process now", "layer": "a decoder layer", "layer_copy": "its sliced copy",
    "tensor_copy": "a tensor's read or cast copy", "embedding": "embeddings", "embedding_copy": "their read copy",
    "head": "LM head", "generation": "KV cache and logits", "held": "layers held while generating",
    "buffer": "calibration buffer", "activation": "one batch's activations", "statistics": "statistics",
    "covariance": "every layer's covariances", "accumulator": "covariance accumulators",
    "update": "their batch product", "solve": "the refit's solve", "writer": "the embeddings as written",
    "slack": "allocator slack",
}
# What lowers a term, for the refusal (`quoted` names become flags in the CLI).
_LEVERS = {
    "buffer": "`nsamples` or `seqlen`", "activation": "`batch_size` or `seqlen`",
    "generation": "`seqlen` or a text `calib`", "head": "a text `calib`", "held": "a text `calib`",
    "accumulator": "`reconstruct` bias", "solve": "`reconstruct` bias", "update": "`reconstruct` bias",
    "covariance": "a smaller `max_memory` (a second pass instead)",
}


@dataclass
class MemoryPlan:
    """What a streamed prune holds, term by term (bytes), and the peak of its phases.

    ``limit_bytes`` is ``max_memory``, or what the machine has available when it is not given
    (``limit_given`` False). ``ls_statistics`` says where the ``ls`` refit's covariances come from
    ("second pass" or "kept"), and ``kept_need_bytes`` the host peak that keeping them needs."""

    checkpoint_bytes: int
    limit_bytes: int
    limit_given: bool
    device: str
    buffer_on_host: bool
    runtime_bytes: int  # this process before the run (interpreter, torch, tokenizer, a resident model)
    layer_bytes: int = 0  # the largest decoder layer, compute dtype, where layers run
    layer_copy_bytes: int = 0  # its sliced tensors while it is written (at most the layer)
    tensor_copy_bytes: int = 0  # host: a layer tensor's read buffer, or its cast while written
    embedding_bytes: int = 0  # the input embeddings, compute dtype
    embedding_copy_bytes: int = 0  # host: their read buffer while cast or moved
    head_bytes: int = 0  # self-calibration: the LM head (untied) and final norm
    generation_bytes: int = 0  # self-calibration: the KV cache of one batch and its logits
    held_bytes: int = 0  # self-calibration: the layers kept resident between tokens
    buffer_bytes: int = 0  # the hidden states of every calibration window
    activation_bytes: int = 0  # one batch through one layer, the statistics hooks included
    statistics_bytes: int = 0  # float64 per-channel statistics and means of every layer
    covariance_bytes: int = 0  # ls, kept: every layer's full float64 covariances (host)
    accumulator_bytes: int = 0  # ls: one layer's covariance accumulators
    update_bytes: int = 0  # ls: their batch product (one row block)
    solve_bytes: int = 0  # ls: the refit's right-hand side, its result and row-block copies
    writer_bytes: int = 0  # host: the embeddings (or LM head) read as stored while they are written
    slack_bytes: int = SLACK_BYTES  # host
    buffer_where: str = "host"
    ls_statistics: str = ""
    kept_need_bytes: int = 0
    device_free_bytes: int = 0

    @property
    def on_device(self) -> bool:
        return self.device != "cpu"

    def phases(self) -> dict[str, tuple[str, ...]]:
        """The terms resident together in each phase of the run, in the order the phases run."""
        second, kept = self.ls_statistics == "second pass", self.ls_statistics == "kept"
        after = ("runtime", "slack", "statistics", "covariance") + (("buffer",) if second else ())
        phases: dict[str, tuple[str, ...]] = {}
        if self.generation_bytes:
            phases["self-calibration"] = ("runtime", "slack", "embedding", "embedding_copy", "head", "generation",
                                          "held", "layer", "tensor_copy")
        if self.buffer_bytes:
            phases["embedding"] = ("runtime", "slack", "statistics", "buffer", "embedding", "embedding_copy")
        phases["statistics pass"] = (("runtime", "slack", "statistics", "covariance", "buffer", "layer", "tensor_copy",
                                      "activation") + (("accumulator", "update") if kept else ()))
        if second:
            phases["second pass"] = after + ("layer", "tensor_copy", "activation", "accumulator", "update")
        if self.solve_bytes:
            phases["refit"] = after + ("layer", "solve") + (("accumulator",) if second else ())
        phases["writing"] = after + ("layer", "layer_copy", "tensor_copy")
        phases["writing the embeddings"] = after + ("writer",)
        return phases

    def _on_device(self, term: str) -> bool:
        if not self.on_device:
            return False
        if term == "buffer":
            return not self.buffer_on_host
        if term == "solve":  # the refit runs where its statistics are: kept covariances wait on the host
            return self.ls_statistics != "kept"
        return term in _DEVICE_TERMS

    def _sums(self, device: bool) -> dict[str, int]:
        return {name: sum(getattr(self, f"{t}_bytes") for t in terms if self._on_device(t) == device)
                for name, terms in self.phases().items()}

    @property
    def host_peak_bytes(self) -> int:
        return max(self._sums(device=False).values())

    @property
    def device_peak_bytes(self) -> int:
        return max(self._sums(device=True).values()) if self.on_device else 0

    def peak_phase(self, device: bool = False) -> str:
        sums = self._sums(device)
        return max(sums, key=sums.__getitem__)

    def _terms(self, device: bool = False) -> list[tuple[str, int]]:
        """The non-zero terms of the peak phase, largest first."""
        terms = [(t, getattr(self, f"{t}_bytes")) for t in self.phases()[self.peak_phase(device)]
                 if self._on_device(t) == device]
        return sorted(((t, b) for t, b in terms if b), key=lambda tb: -tb[1])

    def describe(self) -> str:
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        limit = "--max-memory" if self.limit_given else "what the machine has available"
        text = (f"expected peak host memory {g(self.host_peak_bytes)} of {g(self.limit_bytes)} allowed ({limit}), "
                f"in the {self.peak_phase()}: "
                + ", ".join(f"{_LABELS[t]} {g(b)}" for t, b in self._terms()))
        if self.on_device:
            text += (f"; device memory {g(self.device_peak_bytes)} of {g(self.device_free_bytes)} free, in the "
                     f"{self.peak_phase(True)}: " + ", ".join(f"{_LABELS[t]} {g(b)}" for t, b in self._terms(True)))
        text += f"; checkpoint {g(self.checkpoint_bytes)}, calibration buffer on {self.buffer_where}"
        if self.held_bytes:
            text += f"; {self.held_bytes // self.layer_bytes} layers held while generating"
        if self.ls_statistics == "kept":
            text += (f"; ls covariances kept from the statistics pass ({g(self.covariance_bytes)}: no second pass; "
                     f"a --max-memory below {g(self.host_peak_bytes)} sends them to a second pass)")
        elif self.ls_statistics == "second pass":
            text += (f"; ls covariances from a second calibration pass while writing, one layer at a time (keeping "
                     f"every layer's from the statistics pass would need a peak of {g(self.kept_need_bytes)}: "
                     f"--max-memory {math.ceil(self.kept_need_bytes / GIB * 10) / 10:.1f}GiB or more keeps them and saves that pass)")
        return text

    def check(self) -> MemoryPlan:
        """This plan, or a ``ParameterError`` naming the peak, its terms and what lowers them."""
        if self.host_peak_bytes > self.limit_bytes:
            raise ParameterError("max_memory", f"is {self.limit_bytes / GIB:.2f} GiB, and the run needs about "
                                               f"{self.host_peak_bytes / GIB:.2f} GiB of host memory "
                                               f"({self.describe()}); {self._levers(False)}")
        if self.on_device and self.device_peak_bytes > self.device_free_bytes:
            raise ParameterError("max_memory", f"the run needs about {self.device_peak_bytes / GIB:.2f} GiB on "
                                               f"{self.device}, which has {self.device_free_bytes / GIB:.2f} GiB free "
                                               f"({self.describe()}); {self._levers(True)}")
        return self

    def _levers(self, device: bool) -> str:
        """What lowers the peak, or, where the terms no option touches exceed the limit alone, that figure."""
        terms = self._terms(device)
        movable = [t for t, _ in terms if t in _LEVERS]
        floor = sum(b for t, b in terms if t not in movable)
        limit = self.device_free_bytes if device else self.limit_bytes
        if floor > limit or not movable:
            fixed = ", ".join(_LABELS[t] for t, _ in terms if t not in movable)
            return (f"no option lowers it under the limit: {fixed} alone come to {floor / GIB:.2f} GiB; allow at "
                    "least that, or use a machine with more memory")
        levers = list(dict.fromkeys(_LEVERS[t] for t in movable))
        if device and not self.buffer_on_host and self.buffer_bytes:
            levers.append("`offload_buffer`")
        return "lower it with " + "; ".join(levers)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(host_peak_bytes=self.host_peak_bytes, device_peak_bytes=self.device_peak_bytes,
                    peak_phase=self.peak_phase(), phases={name: list(terms) for name, terms in self.phases().items()})
        return data


def plan_memory(stream: LayerStream, *, windows: tuple[int, int] | None, batch_size: int, generate: int = 0,
                offload_buffer: bool = False, max_memory: int | None = None) -> MemoryPlan:
    """The streaming terms of a run over ``windows`` (nsamples, seqlen) of calibration tokens (None: no
    calibration), ``batch_size`` windows per forward, ``generate`` of them at a time when they are
    self-generated (0: they are not), held to ``max_memory``. The statistics and refit terms, and the
    check, are the caller's (``pruning.statistics.plan_statistics``, ``MemoryPlan.check``)."""
    g = stream.geometry
    elt = torch.empty((), dtype=stream.dtype).element_size()
    stored = torch.empty((), dtype=stream.stored_dtype()).element_size()
    on_device = stream.device.type != "cpu"
    nsamples, seqlen = windows or (0, 0)
    buffer = nsamples * seqlen * g.hidden_size * elt
    layer = max(stream.layer_nbytes(i) for i in range(g.num_layers))
    # A tensor read as stored is cast or moved into a second copy; on the CPU in its own dtype it is used as read.
    copies = on_device or elt != stored
    plan = MemoryPlan(
        checkpoint_bytes=stream.checkpoint_nbytes(),
        limit_bytes=max_memory if max_memory is not None else available_memory_bytes(),
        limit_given=max_memory is not None, device=str(stream.device), buffer_on_host=not on_device,
        runtime_bytes=rss_bytes(), layer_copy_bytes=layer,
        activation_bytes=activation_nbytes(g, min(batch_size, nsamples), seqlen, elt) if nsamples else 0,
        buffer_bytes=buffer,
    )
    if stream.streamed:  # an in-memory model is resident already: the runtime counts it
        vocab = stream.model.config.vocab_size
        plan = replace(plan, layer_bytes=layer, embedding_bytes=stream.embedding_nbytes(),
                       tensor_copy_bytes=stream.largest_layer_tensor_nbytes() * stored // elt if copies else 0,
                       embedding_copy_bytes=stream.embedding_nbytes() * stored // elt if copies else 0,
                       writer_bytes=stream.embedding_nbytes() * stored // elt)
        if generate and nsamples:
            batch = min(generate, nsamples)
            untied = not stream.model.config.tie_word_embeddings
            kv = 2 * g.num_layers * g.num_kv_heads * g.head_dim * seqlen * batch * elt
            plan = replace(plan, head_bytes=(stream.embedding_nbytes() if untied else 0) + g.hidden_size * elt,
                           generation_bytes=kv + 3 * batch * vocab * 4)  # logits, their float copy, softmax
    if on_device:
        free = torch.cuda.mem_get_info(stream.device)[0]
        plan = replace(plan, device_free_bytes=free)
        # The buffer lives on the device unless asked otherwise, or unless it does not fit there.
        if not offload_buffer and plan.device_peak_bytes + buffer <= free:
            plan = replace(plan, buffer_on_host=False, buffer_where=str(stream.device))
        else:
            plan = replace(plan, buffer_where="pinned host memory" + ("" if offload_buffer else
                                                                       f": it does not fit on {stream.device}"))
    return plan


def activation_nbytes(g: Any, batch: int, seqlen: int, elt: int) -> int:
    """One batch of ``batch`` windows through one decoder layer: the residual stream and float32 norms,
    then the larger of attention (q, k, v, their rotary copies, the scores of the math kernel) and the
    MLP (gate, up and their product), each with its statistics hook's transients."""
    tokens = batch * seqlen
    a, kv, m = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim, g.intermediate_size
    attention = tokens * max(elt * (3 * a + 4 * kv), (elt + HOOK_BYTES) * a) + batch * g.num_heads * seqlen**2 * 4
    mlp = tokens * max(3 * elt * m, (elt + HOOK_BYTES) * m)
    return tokens * g.hidden_size * 16 + max(attention, mlp)


def hold_layers(plan: MemoryPlan, num_layers: int) -> MemoryPlan:
    """Self-calibration keeps the first layers resident between tokens, as many as fit: under
    ``max_memory`` when it is given, else under the peak the rest of the run needs anyway (so the
    default stays flat in depth); on an accelerator, in its free memory."""
    if not plan.generation_bytes or not plan.layer_bytes:
        return plan
    if plan.on_device:
        room = plan.device_free_bytes - plan._sums(device=True)["self-calibration"]
    else:
        others = {k: v for k, v in plan._sums(device=False).items() if k != "self-calibration"}
        cap = plan.limit_bytes if plan.limit_given else max(others.values())
        room = cap - plan._sums(device=False)["self-calibration"]
    count = max(0, min(num_layers - 1, room // plan.layer_bytes))
    return replace(plan, held_bytes=count * plan.layer_bytes)
