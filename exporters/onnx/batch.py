"""Sequences in the rows of a KV cache, one class per graph form, behind one interface (numpy only).

A ``RowCache`` holds up to ``rows`` sequences of at most ``capacity`` tokens each; a sequence
lives in one row from its prefill until it is released. ``OnnxCausalLM.generate``, the export
check and the serving engine all drive their model through it:

- ``prefill(rows, prompts, chunk_tokens)``: put each prompt into its (free) row, in graph calls
  of at most ``chunk_tokens`` padded tokens; the logits of each prompt's last token (or of all of
  its tokens with ``all_logits``);
- ``decode(rows, tokens)``: append one token to each of these rows; their next-token logits;
- ``release(rows)``: free rows for new sequences.

``SlotRows`` (gqa form): one preallocated buffer per layer ``[rows, kv_heads, capacity, head_dim]``
that the graph updates in place. A call covers the range of rows between the lowest and highest
row it steps; rows in between that sit it out pass 0 new tokens. Joining and leaving move
nothing, so no other sequence's cache is copied. ``PaddedRows`` (past-present form): the batch's
cache is the graph's own output, each row's tokens right-aligned and left padding masked, so a
join left-pads to the longest row and a leave drops a row (both copy the batch's cache).

The model is duck-typed so that tests can pass numpy fakes: ``attention`` names its form;
past-present models have ``forward(input_ids, attention_mask, position_ids, past, last_only)``
and ``empty_past(batch)``; gqa models have ``kv_buffers(rows, capacity)`` and ``run_rows(kv, lo,
hi, input_ids, seqlens_k, query_seqlens, logits_index)`` (logits ``[hi - lo, kept, vocab]``) and
``max_length``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from flap_deploy.generation.generate import left_pad, positions

from .contract import GQA, PAST_PRESENT, past_from_present


class RowCache:
    """The interface (see the module doc); ``lengths[r]`` is the number of tokens row ``r`` holds."""

    form: ClassVar[str]

    def __init__(self, model: Any, rows: int, capacity: int):
        if rows < 1 or capacity < 1:
            raise ValueError(f"a KV cache needs rows >= 1 and capacity >= 1, got {rows} and {capacity}")
        limit = getattr(model, "max_length", None)
        if limit is not None and capacity > limit:
            raise ValueError(f"a capacity of {capacity} tokens exceeds the graph's max_length {limit}")
        self.model, self.rows, self.capacity = model, rows, capacity
        self.lengths = np.zeros(rows, dtype=np.int64)

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], chunk_tokens: int,
                all_logits: bool = False) -> list[np.ndarray]:
        raise NotImplementedError

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def release(self, rows: Sequence[int]) -> None:
        raise NotImplementedError

    def clear(self) -> None:
        self.release([r for r in range(self.rows) if self.lengths[r]])

    def _check_prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]]) -> None:
        if len(rows) != len(prompts) or len(set(rows)) != len(rows) or not rows:
            raise ValueError("prefill takes one distinct row per prompt")
        for r, p in zip(rows, prompts):
            if not 0 <= r < self.rows or self.lengths[r]:
                raise ValueError(f"row {r} is not a free row of this cache")
            if not 0 < len(p) <= self.capacity:
                raise ValueError(f"a prompt of {len(p)} tokens does not fit a row of {self.capacity} tokens")

    def _check_decode(self, rows: Sequence[int]) -> None:
        for r in rows:
            if not self.lengths[r]:
                raise ValueError(f"row {r} holds no sequence")
            if self.lengths[r] >= self.capacity:
                raise ValueError(f"row {r} is full ({self.capacity} tokens)")


class SlotRows(RowCache):
    """The gqa form: preallocated in-place buffers, a row per sequence (module doc)."""

    form = GQA

    def __init__(self, model: Any, rows: int, capacity: int):
        super().__init__(model, rows, capacity)
        self.kv = model.kv_buffers(rows, capacity)

    def _call(self, rows: Sequence[int], chunks: Sequence[Sequence[int]], all_logits: bool) -> np.ndarray:
        """One graph call appending ``chunks[i]`` (possibly empty) to ``rows[i]`` (consecutive, ascending).

        Returns the logits [len(rows), kept, vocab]: of every chunk position, or of each chunk's
        last token. They may live in a buffer that the next call overwrites.
        """
        lo, hi = rows[0], rows[-1] + 1
        width = max(len(c) for c in chunks)
        ids = np.zeros((hi - lo, width), dtype=np.int64)  # right-padded; padding never enters the cache
        counts = np.zeros(hi - lo, dtype=np.int32)
        for r, chunk in zip(rows, chunks):
            ids[r - lo, :len(chunk)] = chunk
            counts[r - lo] = len(chunk)
        after = self.lengths[lo:hi] + counts
        # a row that sits the call out keeps its length; an empty one still needs seqlens_k >= 0
        seqlens_k = np.maximum(after - 1, 0).astype(np.int32)
        if all_logits:
            index = np.tile(np.arange(width, dtype=np.int64), (hi - lo, 1))
        else:
            index = np.maximum(counts - 1, 0).astype(np.int64)[:, None]
        logits = self.model.run_rows(self.kv, lo, hi, ids, seqlens_k, counts, index)
        self.lengths[lo:hi] = after
        return logits

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], chunk_tokens: int,
                all_logits: bool = False) -> list[np.ndarray]:
        self._check_prefill(rows, prompts)
        order = sorted(range(len(rows)), key=lambda i: rows[i])
        out: list[Any] = [None] * len(rows)
        # runs of consecutive rows share graph calls; a gap would cost a padded row of work
        runs: list[list[int]] = []
        for i in order:
            if runs and rows[i] == rows[runs[-1][-1]] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        try:
            for run in runs:
                width = max(1, chunk_tokens // len(run))
                done = 0
                parts: dict[int, list[np.ndarray]] = {i: [] for i in run}
                while any(len(prompts[i]) > done for i in run):
                    active = [i for i in run if len(prompts[i]) > done]
                    span = list(range(rows[active[0]], rows[active[-1]] + 1))
                    chunks = {rows[i]: list(prompts[i][done:done + width]) for i in active}
                    got = self._call(span, [chunks.get(r, []) for r in span], all_logits)
                    for i in active:
                        b = rows[i] - span[0]
                        if all_logits:
                            parts[i].append(got[b, :len(chunks[rows[i]])].copy())
                        elif len(prompts[i]) <= done + width:  # its last token was in this chunk
                            parts[i].append(got[b, 0].copy())
                    done += width
                for i in run:
                    out[i] = np.concatenate(parts[i]) if all_logits else parts[i][0]
        except BaseException:
            self.release(rows)  # a failed prefill leaves no half-filled row behind
            raise
        return out

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        self._check_decode(rows)
        if len(rows) != len(tokens):
            raise ValueError("decode takes one token per row")
        by_row = dict(zip(rows, tokens))
        span = list(range(min(rows), max(rows) + 1))
        got = self._call(span, [[by_row[r]] if r in by_row else [] for r in span], False)
        return got[np.asarray(rows) - span[0], 0]  # a copy (fancy indexing)

    def release(self, rows: Sequence[int]) -> None:
        self.lengths[list(rows)] = 0  # the row's stale entries are never read again: lengths say what is valid


class PaddedRows(RowCache):
    """The past-present form: the batch's cache as the graph returns it, re-packed on join / leave."""

    form = PAST_PRESENT

    def __init__(self, model: Any, rows: int, capacity: int):
        super().__init__(model, rows, capacity)
        self._order: list[int] = []  # the cache's batch rows, as row ids
        self._past: dict[str, Any] = {}
        self._mask = np.zeros((0, 0), dtype=np.int64)

    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], chunk_tokens: int,
                all_logits: bool = False) -> list[np.ndarray]:
        """Left-padded graph calls of the prompts alone (in column chunks), then their rows join the batch."""
        self._check_prefill(rows, prompts)
        ids, mask = left_pad(prompts, pad_id=0)  # pad positions are masked out
        pos = positions(mask)
        batch, width = ids.shape
        chunk = max(1, chunk_tokens // batch)
        past: dict[str, Any] = self.model.empty_past(batch)
        parts = []
        for start in range(0, width, chunk):
            end = min(width, start + chunk)
            # a chunk's queries attend to the cache of earlier chunks: mask covers [0, end)
            logits, present = self.model.forward(ids[:, start:end], mask[:, :end], pos[:, start:end], past,
                                                 not all_logits)
            past = past_from_present(present)
            parts.append(logits)
        lengths = [len(p) for p in prompts]
        self._join(list(rows), lengths, past, mask)
        if all_logits:
            every = np.concatenate(parts, axis=1)
            return [every[b, width - n:] for b, n in enumerate(lengths)]
        return [parts[-1][b, -1] for b in range(batch)]

    def _join(self, rows: list[int], lengths: list[int], past: dict[str, Any], mask: np.ndarray) -> None:
        for r, n in zip(rows, lengths):
            self.lengths[r] = n
        if not self._order:
            # the prefill batch becomes the batch as it is (OrtValues stay in ORT)
            self._order, self._past, self._mask = rows, past, mask
            return
        b_old = len(self._order)
        p_old = self._mask.shape[1]
        p_new = max([p_old] + lengths)
        width = mask.shape[1]
        merged = {}
        for name, arr in past.items():
            arr = _array(arr)
            _, h, _, d = arr.shape
            out = np.zeros((b_old + len(rows), h, p_new, d), dtype=arr.dtype)
            out[:b_old, :, p_new - p_old:, :] = _array(self._past[name])
            for i, n in enumerate(lengths):
                out[b_old + i, :, p_new - n:, :] = arr[i, :, width - n:, :]
            merged[name] = out
        new_mask = np.zeros((b_old + len(rows), p_new), dtype=np.int64)
        new_mask[:b_old, p_new - p_old:] = self._mask
        for i, n in enumerate(lengths):
            new_mask[b_old + i, p_new - n:] = 1
        self._order = self._order + rows
        self._past, self._mask = merged, new_mask

    def decode(self, rows: Sequence[int], tokens: Sequence[int]) -> np.ndarray:
        self._check_decode(rows)
        if sorted(rows) != sorted(self._order) or len(rows) != len(tokens):
            raise ValueError("the past-present form steps every row it holds, one token each")
        by_row = dict(zip(rows, tokens))
        ids = np.asarray([[by_row[r]] for r in self._order], dtype=np.int64)
        pos = self.lengths[self._order][:, None].astype(np.int64)
        mask = np.concatenate([self._mask, np.ones((len(self._order), 1), dtype=np.int64)], axis=1)
        logits, present = self.model.forward(ids, mask, pos, self._past, True)
        self._past, self._mask = past_from_present(present), mask
        self.lengths[self._order] += 1
        at = {r: b for b, r in enumerate(self._order)}
        return np.stack([logits[at[r], -1] for r in rows])

    def release(self, rows: Sequence[int]) -> None:
        gone = set(rows)
        self.lengths[list(gone)] = 0
        keep = [b for b, r in enumerate(self._order) if r not in gone]
        if len(keep) == len(self._order):
            return
        if not keep:
            self._order, self._past = [], {}
            self._mask = np.zeros((0, 0), dtype=np.int64)
            return
        order = [self._order[b] for b in keep]
        p_old = self._mask.shape[1]
        cut = p_old - int(self.lengths[order].max())  # columns left of this are padding in every kept row
        idx = np.asarray(keep)
        self._past = {k: np.ascontiguousarray(_array(v)[idx, :, cut:, :]) for k, v in self._past.items()}
        self._mask = np.ascontiguousarray(self._mask[idx, cut:])
        self._order = order


CACHES: dict[str, type[RowCache]] = {c.form: c for c in (SlotRows, PaddedRows)}


def new_cache(model: Any, rows: int, capacity: int) -> RowCache:
    """The row cache of the model's graph form (``model.attention``; past-present when it has none)."""
    return CACHES[getattr(model, "attention", PAST_PRESENT)](model, rows, capacity)


def _array(x: Any) -> np.ndarray:
    """A numpy view of a cache tensor (the ONNX runtime hands back OrtValues)."""
    return x if isinstance(x, np.ndarray) else x.numpy()
