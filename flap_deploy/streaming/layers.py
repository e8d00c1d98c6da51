"""A decoder with one layer resident at a time: the one way pruning and evaluation run a model.

``LayerStream.open(source)`` takes a checkpoint (a ``ModelRef``: its safetensors are read
tensor by tensor, never mapped, see ``shards``) or an in-memory model. For a checkpoint the
transformers model is built as a skeleton on the meta device: embeddings, norm and LM head
are read when needed, a decoder layer is read on entering ``stream.layer(i)`` and dropped on
leaving it. An in-memory model is the same object with every layer already resident, so it
goes through exactly the same code (materializing and releasing do nothing).

Layers run in the checkpoint's dtype on an accelerator and in float32 on the CPU unless a
dtype is given; statistics accumulate in float64 wherever they are computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.io.shards import DTYPES, ShardedReader
from flap_deploy.model.adapters import Adapter, Geometry, runnable_adapter
from flap_deploy.streaming.memory import give_back_memory

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


Hook = tuple[nn.Module, Callable[..., Any]]


@contextlib.contextmanager
def hooks(*pre: Hook, after: Sequence[Hook] = (), with_kwargs: bool = False) -> Iterator[None]:
    """Forward pre-hooks ``(module, fn)`` (and forward hooks ``after``) for the block, removed when it
    ends, however it ends: the package's one way of hooking a module's forward. ``with_kwargs``
    passes the pre-hooks the call's keyword arguments too."""
    handles = []
    try:
        for module, fn in pre:
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))
        for module, fn in after:
            handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU; a CUDA device that is not there is an error."""
    name = str(device or "auto")
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ParameterError("device", f"{name!r} is not a device ({DEVICE_CHOICES})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError("device", f"{name}: no CUDA device is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParameterError("device", f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ParameterError("device", f"{name!r}: only {DEVICE_CHOICES} are supported")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The compute dtype: as given, else the checkpoint's on an accelerator and float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return checkpoint_dtype if device.type != "cpu" else torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise ParameterError("dtype", f"{dtype!r}: choose auto, {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[dtype]


class LayerStream:
    """A transformers causal LM whose decoder layers enter and leave memory one at a time."""

    def __init__(self, model: nn.Module, *, reader: ShardedReader | None, device: torch.device,
                 dtype: torch.dtype, name: str, revision: str | None = None):
        self.model = model
        self.reader = reader
        self.device = device
        self.dtype = dtype
        self.name = name
        self.revision = revision  # the commit of a Hugging Face Hub source (ModelRef.revision)
        self.adapter: Adapter = runnable_adapter(model.config)
        self.geometry: Geometry = self.adapter.geometry(model.config)
        self.layers: nn.ModuleList = self.adapter.layers(model)
        self._held: set[int] = set()  # layers kept resident by ``paged``

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, source: Any, *, device: str | torch.device | None = "auto",
             dtype: str | torch.dtype | None = None) -> LayerStream:
        """A stream over a ``ModelRef`` / checkpoint directory / bundled name, or an in-memory model
        (which keeps its own device and dtype).

        For a checkpoint every tensor the architecture needs is checked (present, right shape)
        from the shard headers before anything is read."""
        dev = resolve_device(device)
        if isinstance(source, nn.Module):
            param = next(source.parameters())
            # an in-memory model runs where and as it is
            return cls(source.eval(), reader=None, device=param.device, dtype=param.dtype,
                       name=getattr(source.config, "_name_or_path", "") or "<in-memory model>")
        from flap_deploy.io.model_ref import CHECKPOINTS, resolve_model

        ref = resolve_model(source, accept=CHECKPOINTS, check_weights=False)
        reader = ShardedReader(ref.path)
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config = ref.hf_config()
        stored = _stored_dtype(reader)
        compute = resolve_dtype(dtype, dev, stored)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=compute)
        model.eval()
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        for name, buf in list(model.named_buffers()):
            _set_tensor(model, name, buf.to(dev), parameter=False)
        _check_tensors(model, reader, ref.path)
        return cls(model, reader=reader, device=dev, dtype=compute, name=ref.arg, revision=ref.revision)

    # ------------------------------------------------------------------ residency

    @property
    def streamed(self) -> bool:
        """True for a checkpoint read on demand, False for an in-memory model."""
        return self.reader is not None

    def materialize(self, module: nn.Module, prefix: str) -> None:
        """Read every parameter of ``module`` (named ``prefix`` + its name in the checkpoint) that is not resident."""
        if self.reader is None:
            return
        for name, param in list(module.named_parameters()):
            if param.device.type == "meta":
                _set_tensor(module, name, self.reader.read(prefix + name, self.dtype, self.device))

    def release(self, module: nn.Module) -> None:
        """Drop ``module``'s parameters back to the meta device (their memory is freed)."""
        if self.reader is None:
            return
        for name, param in list(module.named_parameters()):
            if param.device.type != "meta":
                _set_tensor(module, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))
        give_back_memory()

    @contextlib.contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer ``i``, resident inside the block."""
        layer = self.layers[i]
        self.materialize(layer, f"model.layers.{i}.")
        try:
            yield layer
        finally:
            if i not in self._held:
                self.release(layer)

    def load_head(self, lm_head: bool = False) -> None:
        """Embeddings (and, for logits, the final norm and LM head) resident."""
        inner = self.model.model
        self.materialize(inner.embed_tokens, "model.embed_tokens.")
        if lm_head:
            self.materialize(inner.norm, "model.norm.")
            if self.model.config.tie_word_embeddings:
                self.model.lm_head.weight = inner.embed_tokens.weight
            else:
                self.materialize(self.model.lm_head, "lm_head.")

    def release_head(self) -> None:
        inner = self.model.model
        for module in (inner.embed_tokens, inner.norm, self.model.lm_head):
            self.release(module)

    @contextlib.contextmanager
    def paged(self, budget_bytes: int | None = None) -> Iterator[nn.Module]:
        """The whole model usable by its own forward (e.g. generation): a layer is read as it is
        entered and dropped after, except the first layers that fit in ``budget_bytes``, which stay."""
        if self.reader is None:
            yield self.model
            return
        per_layer = max(self.layer_nbytes(i) for i in range(len(self.layers)))
        keep = len(self.layers) if budget_bytes is None else max(0, int(budget_bytes // max(per_layer, 1)))
        self._held = set(range(min(keep, len(self.layers))))
        self.load_head(lm_head=True)
        enter = [(layer, lambda module, args, i=i: self.materialize(module, f"model.layers.{i}."))
                 for i, layer in enumerate(self.layers)]
        leave = [(layer, lambda module, args, out, i=i: None if i in self._held else self.release(module))
                 for i, layer in enumerate(self.layers)]
        try:
            with hooks(*enter, after=leave):
                yield self.model
        finally:
            held, self._held = self._held, set()
            for i in held:
                self.release(self.layers[i])
            self.release_head()

    # ------------------------------------------------------------------ sizes

    def _nbytes(self, prefix: str) -> int:
        """Bytes of the parameters under ``prefix`` in the compute dtype."""
        size = torch.empty((), dtype=self.dtype).element_size()
        if self.reader is None:
            return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if n.startswith(prefix))
        return sum(e.numel * size for n, e in self.reader.entries.items() if n.startswith(prefix))

    def layer_nbytes(self, i: int) -> int:
        return self._nbytes(f"model.layers.{i}.")

    def embedding_nbytes(self) -> int:
        return self._nbytes("model.embed_tokens.")

    def largest_layer_tensor_nbytes(self) -> int:
        """The largest tensor of any decoder layer, in the compute dtype."""
        size = torch.empty((), dtype=self.dtype).element_size()
        if self.reader is None:
            return max(p.numel() * p.element_size() for p in self.layers.parameters())
        return max(e.numel * size for n, e in self.reader.entries.items() if n.startswith("model.layers."))

    def checkpoint_nbytes(self) -> int:
        if self.reader is None:
            return sum(p.numel() * p.element_size() for p in self.model.parameters())
        return self.reader.nbytes

    def stored_tensor(self, name: str) -> torch.Tensor:
        """A non-layer tensor (embeddings, norm, LM head) as the source stores it, read on its own."""
        if self.reader is not None:
            return self.reader.read(name)
        return self.model.get_parameter(name).detach()

    def stored_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (what a pruned checkpoint is written in)."""
        return _stored_dtype(self.reader) if self.reader is not None else self.dtype


def _stored_dtype(reader: ShardedReader) -> torch.dtype:
    entry = reader.entries.get("model.embed_tokens.weight") or next(iter(reader.entries.values()))
    return DTYPES[entry.dtype]


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, parameter: bool = True) -> None:
    path, _, attr = name.rpartition(".")
    owner = root.get_submodule(path) if path else root
    if parameter:
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[attr] = tensor


def _check_tensors(model: nn.Module, reader: ShardedReader, path: Any) -> None:
    """Every parameter of the architecture is in the shards with its shape; one-line error otherwise."""
    for name, param in model.named_parameters():
        entry = reader.entries.get(name)
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        where = f" (layer {layer})" if layer is not None else ""
        if entry is None:
            raise FlapDeployError(f"{path}: tensor '{name}' is missing{where}")
        if tuple(entry.shape) != tuple(param.shape):
            raise FlapDeployError(f"{entry.file}: tensor '{name}' has shape {list(entry.shape)}, the config says "
                                  f"{list(param.shape)}{where}")
