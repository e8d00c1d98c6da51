"""Safetensors files without loading a model: headers, reading one tensor, writing shards.

Reading uses positioned reads into a fresh buffer, never a memory map: a mapped shard's
touched pages count as the process's resident memory until it is unmapped, so streaming a
checkpoint layer by layer through ``safe_open`` would grow the resident set to the whole
checkpoint. Writing knows every tensor's name, dtype and shape up front (the checkpoint
contract gives them), so each shard's header is written first and tensors are appended as
they are produced: nothing is held back until the end.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flap_deploy.errors import FlapDeployError

INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1000**3  # "2GB" as transformers' save_pretrained counts it

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def safetensors_header_bytes(file: Path) -> bytes:
    """The raw header of one safetensors file: its 8-byte length then the JSON, as stored."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FlapDeployError(f"{file}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FlapDeployError(f"{file}: truncated safetensors file (header of {n} bytes, file of {size})")
        return head + f.read(n)


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries of one safetensors file; checks that the file holds every byte it declares."""
    raw = safetensors_header_bytes(file)
    try:
        header = json.loads(raw[8:])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FlapDeployError(f"{file}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((e["data_offsets"][1] for e in header.values()), default=0)
    size = file.stat().st_size
    if len(raw) + end > size:
        raise FlapDeployError(f"{file}: truncated safetensors file ({size} bytes, needs {len(raw) + end})")
    return header


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class ShardedReader:
    """Every tensor of a checkpoint directory (one file, or shards listed by the index), read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise FlapDeployError(f"{index}: not a safetensors index (no weight_map)") from None
            files = sorted({self.path / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise FlapDeployError(f"{index}: shard {f.name} is listed but missing")
        else:
            weight_map = None
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FlapDeployError(f"{self.path}: no .safetensors weight files")
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            raw_len = len(safetensors_header_bytes(f))
            for name, e in read_safetensors_header(f).items():
                if e["dtype"] not in DTYPES:
                    raise FlapDeployError(f"{f}: tensor '{name}' has unsupported dtype {e['dtype']}")
                b, end = e["data_offsets"]
                self.entries[name] = TensorEntry(f, e["dtype"], tuple(e["shape"]), raw_len + b, raw_len + end)
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.entries:
                    raise FlapDeployError(f"{self.path / file}: tensor '{name}' is listed in {INDEX_NAME} but absent")

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, name: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, read into fresh memory, then cast and moved (the read buffer is dropped)."""
        e = self.entries[name]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        with open(e.file, "rb", buffering=0) as f:
            f.seek(e.start)
            view = memoryview(buf.numpy())
            got = 0
            while got < e.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise FlapDeployError(f"{e.file}: truncated while reading tensor '{name}'")
                got += n
        t = buf.view(DTYPES[e.dtype]).reshape(e.shape)
        return t.to(device=device, dtype=dtype or t.dtype)


class ShardWriter:
    """Writes tensors of a known layout into safetensors shards of at most ``max_bytes``, in layout order.

    ``layout``: (name, shape, dtype) in the order the tensors will be written. Shards are
    named as transformers names them, with an index when there is more than one.
    """

    def __init__(self, out: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_bytes: int = MAX_SHARD_BYTES):
        self.out = Path(out)
        sizes = [(name, shape, dtype, _nbytes(shape, dtype)) for name, shape, dtype in layout]
        shards: list[list[tuple]] = [[]]
        used = 0
        for item in sizes:
            if shards[-1] and used + item[3] > max_bytes:
                shards.append([])
                used = 0
            shards[-1].append(item)
            used += item[3]
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self._order = [(name, shape, dtype, k) for k, shard in enumerate(shards) for name, shape, dtype, _ in shard]
        self._shards = shards
        self._next = 0
        self._handle = None
        self._open = -1
        self.total_bytes = sum(s[3] for s in sizes)

    def _start(self, k: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in self._shards[k]:
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._handle = open(self.out / self.files[k], "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._open = k

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor of the layout (checked against it)."""
        want, shape, dtype, k = self._order[self._next]
        if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"shard writer expected {want} {tuple(shape)} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if k != self._open:
            self._start(k)
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        self._handle.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"shard writer closed after {self._next} of {len(self._order)} tensors")
        if self._handle is not None:
            self._handle.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[k] for name, _, _, k in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n
