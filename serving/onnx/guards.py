"""What keeps the ONNX Runtime server bounded: header deadlines, memory give-back, the memory budget.

Kept apart from the request handling in ``server.py``; nothing here imports ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol class with a deadline for a connection's first request headers.

    uvicorn times out idle keep-alive connections but not a client that opens a connection and
    sends its headers byte by byte (slowloris): such a connection is closed after ``seconds``.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools missing: the pure-Python parser
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderDeadlineProtocol(Base):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._header_deadline = self.loop.call_later(seconds, self._headers_overdue)

        def _headers_overdue(self) -> None:
            if self.cycle is None and not self.transport.is_closing():  # no complete request head yet
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_deadline.cancel()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def memory_budget(manifest: dict[str, Any], *, max_num_seqs: int, max_model_len: int,
                  max_prefill_tokens: int) -> dict[str, int]:
    """Upper estimates (bytes) of what the server holds: weights, the KV cache when every slot is
    full, and one prefill chunk's activations (attention scores of the widest layer dominate)."""
    itemsize = np.dtype(manifest["dtype"]).itemsize
    kv_heads = [manifest["num_key_value_heads_per_layer"][i] for i in manifest["cache_layers"]]
    kv_per_token = 2 * sum(kv_heads) * manifest["head_dim"] * itemsize
    heads = max(manifest.get("num_attention_heads_per_layer") or [1])
    hidden = manifest.get("hidden_size") or heads * manifest["head_dim"]
    widest_mlp = max(manifest.get("intermediate_size_per_layer") or [4 * hidden])
    # scores [heads, chunk, context] in float32 (score, mask, softmax), plus the MLP's [chunk, width] x3
    prefill = max_prefill_tokens * (3 * heads * max_model_len * 4 + 3 * widest_mlp * itemsize)
    weights = int(manifest.get("graph_bytes") or 0)
    return {"weights": weights, "kv_cache": max_num_seqs * max_model_len * kv_per_token,
            "kv_bytes_per_token": kv_per_token, "prefill": prefill}
