"""Generation on ONNX Runtime: ``OnnxCausalLM`` drives an exported decoder of either graph form.

The graph call of each form: ``forward`` (past-present: the cache goes in as ``past_key_values.*``
and comes back grown as ``present.*`` OrtValues, fed back unchanged) and ``run_rows`` (gqa:
inputs and outputs bound with IO binding, the KV buffers bound as both past and present so that
the graph appends in place and a decode step copies no cache). ``new_cache`` wraps either in the
form's ``batch.RowCache``, over which ``generate`` runs the loop every runtime shares
(``flap_deploy.generation.generate.decode``: greedy or sampled tokens, EOS and stop strings). The module-level
``generate`` is the ONNX twin of ``flap_deploy.generation.generate.generate`` (text prompts in,
``Generation`` records out).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from flap_deploy.errors import FlapDeployError
from flap_deploy.generation.generate import Generation, decode, encode_prompt
from flap_deploy.generation.sampling import SamplingParams

from .batch import RowCache, new_cache
from .contract import (
    GQA,
    LOGITS_INDEX,
    PAST_PRESENT,
    QUERY_SEQLENS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    CacheLayer,
    form_of,
    logits_index,
    past_from_present,
)
from .manifest import MODEL_NAME, cache_layers_of, check_graph_io, read_manifest

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
# Padded tokens per prefill call in ``generate`` (a longer batch is prefilled in chunks).
PREFILL_TOKENS = 4096

Past = dict[str, Any]  # name -> OrtValue | np.ndarray


class KVBuffers:
    """The gqa form's cache: per layer ``[rows, kv_heads, capacity, head_dim]`` arrays, and the IO binding.

    The arrays are allocated once (zero pages, so memory is committed as rows fill) and bound
    by address: a call over rows ``[lo, hi)`` binds that contiguous slice as ``past_key_values.*``
    and as ``present.*``. Last-token logits land in a preallocated ``[rows, 1, vocab]`` buffer.
    """

    def __init__(self, lm: OnnxCausalLM, rows: int, capacity: int):
        self.capacity = capacity
        self.arrays = {name: np.zeros((rows, c.kv_heads, capacity, c.head_dim), lm.dtype)
                       for c in lm.layers for name in c.past_names}
        self.logits = np.zeros((rows, 1, lm.vocab_size), lm.dtype)
        self.binding = lm.session.io_binding()
        self.binding.bind_output("logits", "cpu")  # first, so that it is get_outputs()[0]
        self.bound: tuple[int, int] | None = None  # the row range the cache is bound to
        self.inputs: dict[str, np.ndarray] = {}  # kept alive while bound

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + self.logits.nbytes


class OnnxCausalLM:
    """An exported FlapLlama decoder on ONNX Runtime."""

    def __init__(self, path: Path, session: ort.InferenceSession, manifest: dict[str, Any], tokenizer: Any = None):
        self.path = path
        self.session = session
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.layers: list[CacheLayer] = cache_layers_of(manifest)
        self.attention = form_of(manifest)
        # longest sequence: the rotary caches' positions (gqa), the model's positions (past-present)
        self.max_length: int | None = manifest.get("max_length") or manifest.get("max_position_embeddings")
        self.vocab_size: int = manifest.get("vocab_size") or 0
        self.dtype = NP_DTYPES[manifest["dtype"]]
        self.output_names: list[str] = list(manifest["outputs"])
        # graphs exported before logits_index existed compute every position's logits
        self.has_logits_index = LOGITS_INDEX in manifest["inputs"]
        eos = manifest.get("eos_token_id") or []
        self.eos_token_ids: list[int] = [int(e) for e in eos]
        pad = manifest.get("pad_token_id")
        self.pad_token_id: int = int(pad if pad is not None else (self.eos_token_ids or [0])[0])

    @classmethod
    def from_dir(cls, path: str | os.PathLike, threads: int | None = None,
                 graph_optimization_level: str | ort.GraphOptimizationLevel = "all",
                 providers: Sequence[str] | None = None,
                 session_config: dict[str, str] | None = None, memory_arena: bool = True) -> OnnxCausalLM:
        """Load an export directory (graph, manifest, tokenizer when present).

        ``threads``: ORT intra-op threads (None = ORT's default). ``graph_optimization_level``:
        "disable" | "basic" | "extended" | "all" or an ``ort.GraphOptimizationLevel``.
        ``session_config``: extra ORT session config entries, e.g.
        ``{"session.intra_op.allow_spinning": "0"}`` when other work shares the cores.
        ``memory_arena=False``: no CPU arena, so the memory of a peak (a long prefill) is
        freed when the call ends instead of kept for reuse (the server's choice).
        Raises FlapDeployError when the manifest does not describe the graph.
        """
        path = Path(path)
        manifest = read_manifest(path)
        opts = ort.SessionOptions()
        opts.enable_cpu_mem_arena = memory_arena
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        if isinstance(graph_optimization_level, str):
            if graph_optimization_level not in OPT_LEVELS:
                raise FlapDeployError(
                    f"graph optimization level {graph_optimization_level!r}: expected one of {', '.join(OPT_LEVELS)}"
                )
            graph_optimization_level = OPT_LEVELS[graph_optimization_level]
        opts.graph_optimization_level = graph_optimization_level
        for key, value in (session_config or {}).items():
            opts.add_session_config_entry(key, str(value))
        try:
            session = ort.InferenceSession(str(path / manifest.get("model", MODEL_NAME)), opts,
                                           providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as e:  # ORT raises its own exception types for an unreadable graph
            raise FlapDeployError(f"{path}: ONNX Runtime cannot load the graph ({str(e).splitlines()[0]})") from None
        check_graph_io(manifest, session.get_inputs(), session.get_outputs(), path)
        tokenizer = None
        if manifest.get("tokenizer"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(path, session, manifest, tokenizer)

    # -- one graph call -------------------------------------------------------------------

    def _require(self, form: str, call: str) -> None:
        if self.attention != form:
            raise FlapDeployError(f"{self.path}: {call} is the {form} form's graph call, this export is "
                                  f"{self.attention}; use new_cache()")

    def empty_past(self, batch: int) -> dict[str, ort.OrtValue]:
        """A zero-length cache for ``batch`` rows (the past of a prefill; past-present form)."""
        self._require(PAST_PRESENT, "empty_past")
        past = {}
        for c in self.layers:
            for name in c.past_names:
                past[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, c.kv_heads, 0, c.head_dim), self.dtype))
        return past

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: Past, last_only: bool = False) -> tuple[np.ndarray, dict[str, ort.OrtValue]]:
        """Run the past-present graph once.

        ``past`` maps ``past_key_values.{i}.key|value`` (or the previous step's
        ``present.*`` names) to OrtValues or arrays [batch, kv_heads_i, past, head_dim];
        ``attention_mask`` covers past + new tokens. Returns logits [batch, seq, vocab]
        (numpy; [batch, 1, vocab] of the last position with ``last_only``, which the graph
        computes alone when it has the ``logits_index`` input) and ``present.{i}.key|value``
        as OrtValues, ready to be fed back.
        """
        self._require(PAST_PRESENT, "forward")
        feed: dict[str, ort.OrtValue] = {
            "input_ids": _ortvalue(input_ids, np.int64),
            "attention_mask": _ortvalue(attention_mask, np.int64),
            "position_ids": _ortvalue(position_ids, np.int64),
        }
        past = past_from_present(past)
        for c in self.layers:
            for name in c.past_names:
                if name not in past:
                    raise FlapDeployError(f"forward: past is missing '{name}'")
                feed[name] = _ortvalue(past[name], self.dtype)
        if self.has_logits_index:
            feed[LOGITS_INDEX] = _ortvalue(logits_index(np.shape(input_ids)[1], last_only), np.int64)
        outputs = self.session.run_with_ort_values(self.output_names, feed)
        present = dict(zip(self.output_names[1:], outputs[1:]))
        logits = outputs[0].numpy()
        if last_only and not self.has_logits_index:
            logits = logits[:, -1:]
        return logits, present

    def kv_buffers(self, rows: int, capacity: int) -> KVBuffers:
        """The gqa form's cache of ``rows`` rows of ``capacity`` tokens (see ``KVBuffers``)."""
        self._require(GQA, "kv_buffers")
        return KVBuffers(self, rows, capacity)

    def run_rows(self, kv: KVBuffers, lo: int, hi: int, input_ids: np.ndarray, seqlens_k: np.ndarray,
                 query_seqlens: np.ndarray, logits_index: np.ndarray) -> np.ndarray:
        """Run the gqa graph once over cache rows ``[lo, hi)``, appending in place.

        ``input_ids`` [hi - lo, seq] right-padded, ``query_seqlens`` the new tokens per row (0:
        the row sits the call out), ``seqlens_k`` each row's cache length after the call minus one,
        ``logits_index`` [hi - lo, kept] the positions whose logits come back ([hi - lo, kept,
        vocab]; with kept 1 a view of the preallocated buffer, valid until the next call).
        """
        io = kv.binding
        kv.inputs = {"input_ids": np.ascontiguousarray(input_ids, np.int64),
                     SEQLENS_K: np.ascontiguousarray(seqlens_k, np.int32),
                     QUERY_SEQLENS: np.ascontiguousarray(query_seqlens, np.int32),
                     TOTAL_SEQUENCE_LENGTH: np.asarray(kv.capacity, np.int32),
                     LOGITS_INDEX: np.ascontiguousarray(logits_index, np.int64)}
        for name, value in kv.inputs.items():
            io.bind_cpu_input(name, value)
        if kv.bound != (lo, hi):
            for c in self.layers:
                for past, present in zip(c.past_names, c.present_names):
                    arr = kv.arrays[past]
                    shape, address = [hi - lo, *arr.shape[1:]], arr.ctypes.data + lo * arr.strides[0]
                    io.bind_input(past, "cpu", 0, self.dtype, shape, address)
                    io.bind_output(present, "cpu", 0, self.dtype, shape, address)
            kv.bound = (lo, hi)
        last_only = logits_index.shape[1] == 1
        if last_only:
            out = kv.logits[lo:hi]
            io.bind_output("logits", "cpu", 0, self.dtype, list(out.shape), out.ctypes.data)
        else:
            io.bind_output("logits", "cpu")
        self.session.run_with_iobinding(io)
        return out if last_only else io.get_outputs()[0].numpy()

    def new_cache(self, rows: int, capacity: int | None = None) -> RowCache:
        """A cache of ``rows`` sequences of up to ``capacity`` tokens (default: ``max_length``) for this graph form."""
        capacity = capacity or self.max_length
        if capacity is None:
            raise FlapDeployError(f"{self.path}: the manifest states no max_length; pass a capacity")
        return new_cache(self, rows, capacity)

    # -- generation -----------------------------------------------------------------------

    def encode(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Token ids for text prompts (needs a tokenizer) or pass ids through; always a batch."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise FlapDeployError("generate: no prompts")
        if all(isinstance(t, (int, np.integer)) for t in prompts):
            return [[int(t) for t in prompts]]
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise FlapDeployError(f"{self.path}: no tokenizer in the export; pass token ids instead of text")
                out.append(list(self.tokenizer(p)["input_ids"]))
            else:
                out.append([int(t) for t in p])
        if any(len(p) == 0 for p in out):
            raise FlapDeployError("generate: empty prompt")
        return out

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                 params: SamplingParams | None = None, **sampling: Any) -> list[Generation]:
        """Generate for a batch of prompts (text or token ids), one row of this graph's cache each
        (``new_cache``): the generation loop every runtime runs (``flap_deploy.generation.generate.decode``:
        sampling, seeds, EOS, stop tokens and strings, ``max_tokens``, and ``max_length``: a row ends
        "length" when prompt and generated tokens reach it).

        ``params``, or its fields as keywords (``max_tokens=32, temperature=0.7, ...``).
        """
        if params is None:
            params = SamplingParams(**sampling)
        elif sampling:
            raise TypeError("generate: pass either params or sampling keywords, not both")
        if params.stop and self.tokenizer is None:
            raise FlapDeployError(f"{self.path}: stop strings need a tokenizer, and the export has none")
        batch = self.encode(prompts)
        longest = max(len(p) for p in batch)
        if self.max_length and longest >= self.max_length:
            raise FlapDeployError(f"generate: a prompt of {longest} tokens leaves no room for a token within the "
                                  f"graph's max_length {self.max_length}")
        # prompt + generated tokens stay within max_length (the last token is never cached)
        capacity = longest + params.max_tokens - 1
        capacity = min(capacity, self.max_length - 1) if self.max_length else capacity
        return decode(self.new_cache(len(batch), capacity), batch, params, eos=self.eos_token_ids,
                      detokenize=self.decode, max_length=self.max_length, chunk_tokens=PREFILL_TOKENS)


def generate(model_dir: str | os.PathLike, prompts: Sequence[str], params: SamplingParams,
             threads: int | None = None, chat: bool = False) -> list[Generation]:
    """One Generation per text prompt, from an export directory (``flap_deploy.generation.generate.generate``'s twin)."""
    lm = OnnxCausalLM.from_dir(model_dir, threads=threads)
    if lm.tokenizer is None:
        raise FlapDeployError(f"{model_dir}: the export has no tokenizer files, so it cannot take text prompts")
    return lm.generate([encode_prompt(lm.tokenizer, p, chat) for p in prompts], params=params)


def _ortvalue(x: Any, dtype: Any) -> ort.OrtValue:
    if isinstance(x, ort.OrtValue):
        return x
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(np.asarray(x, dtype=dtype)))
