"""Continuous-batching generation engine over a model with the ONNX KV-cache contract.

One engine thread owns the model session and loops over steps. Each step:
  1. drops aborted sequences (client gone, stop string seen),
  2. admits waiting requests while fewer than `max_num_seqs` run: the admitted prompts are
     prefilled together, left-padded, in batches of at most `max_prefill_tokens` padded tokens
     (one graph call instead of one per prompt, so TTFT does not grow with every arrival);
     a prompt longer than that is prefilled in chunks of `max_prefill_tokens` columns, each
     chunk attending to the cache of the ones before, so a prefill's activations are bounded
     by configuration, not by the prompt. Only the last position's logits are computed.
     Their first tokens are sampled.
  3. runs one decode step for the whole running batch.

A failure while sampling or running one request ends that request with the error (its sink
gets the exception) and the engine goes on; a failed decode step fails the running batch
only. Anything else that escapes the loop stops the engine: `error` is set, every pending
request gets the error, and `on_death(error)` is called (the server then exits non-zero).

The running batch keeps its KV cache as batched arrays `[batch, kv_heads, P, head_dim]`
with each row's real entries at the right end and zeros on the left; the attention mask
has zeros over the padding and `position_ids` are per row, so a padded row computes what it
would compute alone. The arrays returned by one step are fed to the next unchanged; they
are re-packed only when a sequence joins (left-pad to the longest row) or leaves (drop
its row, trim columns that are padding in every row).

The model is anything with `forward(input_ids, attention_mask, position_ids, past, last_only) ->
(logits, present)` and `empty_past(batch)` on the ONNX contract (`exporters.onnx.OnnxCausalLM`);
with `last_only` true the logits may be those of the last position only ([batch, 1, vocab]).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import numpy as np

from exporters.onnx.contract import past_from_present
from flap_deploy.generation.generate import left_pad, positions
from flap_deploy.generation.sampling import (
    SamplingParams,
    log_softmax,
    next_token,
    top_logprobs,
)


class ContractModel(Protocol):
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: dict[str, np.ndarray], last_only: bool = False
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...

    def empty_past(self, batch: int) -> dict[str, np.ndarray]: ...


class QueueFull(Exception):
    """The waiting queue is at its bound; the server answers 503."""


class EngineDead(Exception):
    """The engine thread stopped (shut down or crashed)."""


class RequestFailed(Exception):
    """One request failed inside the engine (sampling or its graph call); the others go on."""


@dataclass
class TokenEvent:
    """One generated token, sent to the request's sink from the engine thread."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (stop token), "length", or None while running


@dataclass
class _Sequence:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[TokenEvent | BaseException], None]
    arrival: float
    rng: np.random.Generator
    output_ids: list[int] = field(default_factory=list)
    length: int = 0  # tokens held in the KV cache
    first_token_time: float | None = None
    finished: bool = False


def _array(x: Any) -> np.ndarray:
    """A numpy view of a cache tensor (the ONNX runtime hands back OrtValues)."""
    return x if isinstance(x, np.ndarray) else x.numpy()


class Engine:
    """Continuous batching over a contract model; thread-safe `submit` / `abort`."""

    def __init__(self, model: ContractModel, *, max_model_len: int, max_num_seqs: int = 8,
                 max_queue: int = 256, eos_token_ids: tuple[int, ...] = (), metrics: Any = None,
                 idle_wait_s: float = 0.5, max_prefill_tokens: int = 1024,
                 on_death: Callable[[BaseException], None] | None = None,
                 after_prefill: Callable[[int], None] | None = None):
        if max_num_seqs < 1 or max_queue < 0 or max_model_len < 2 or max_prefill_tokens < 1:
            raise ValueError("max_num_seqs >= 1, max_queue >= 0, max_model_len >= 2 and max_prefill_tokens >= 1 "
                             "are required")
        self.model = model
        # bounds one prefill call: [batch, chunk] tokens with batch * chunk <= max_prefill_tokens
        self.max_prefill_tokens = max_prefill_tokens
        self.on_death = on_death
        self.after_prefill = after_prefill  # called with the prefilled token count (the server trims memory)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self.eos_token_ids = tuple(eos_token_ids)
        self.metrics = metrics
        self._idle_wait_s = idle_wait_s
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._aborts: set[int] = set()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # the running batch
        self._rows: list[_Sequence] = []
        self._past: dict[str, np.ndarray] = {}
        self._mask = np.zeros((0, 0), dtype=np.int64)
        self._admitted: list[_Sequence] = []  # taken from the queue, being prefilled
        self._global_rng = np.random.default_rng()

    # ---------------------------------------------------------------- public API

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="flap-engine", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               sink: Callable[[TokenEvent | BaseException], None]) -> int:
        """Queue a request; its tokens go to `sink` (called from the engine thread).

        Raises QueueFull when the waiting queue is at its bound, EngineDead when stopped,
        ValueError when the request cannot fit the context.
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the context length {self.max_model_len}")
        seq = _Sequence(id=next(self._ids), prompt_ids=list(prompt_ids), params=params, sink=sink,
                        arrival=time.perf_counter(),
                        rng=np.random.default_rng(params.seed % 2**64) if params.seed is not None else self._global_rng)
        with self._cond:
            if self._stop or not self.alive:
                raise EngineDead("the engine is not running")
            if len(self._waiting) >= self.max_queue:
                if self.metrics:
                    self.metrics.of(self.metrics.rejected).inc()
                raise QueueFull(f"the waiting queue is full ({self.max_queue} requests)")
            self._waiting.append(seq)
            self._set_gauges()
            self._cond.notify_all()
        return seq.id

    def abort(self, request_id: int) -> None:
        """Stop a request (client disconnected, stop string seen); its slot frees next step."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._rows), "waiting": len(self._waiting)}

    # ---------------------------------------------------------------- engine thread

    def _set_gauges(self) -> None:
        if self.metrics:
            self.metrics.of(self.metrics.running).set(len(self._rows))
            self.metrics.of(self.metrics.waiting).set(len(self._waiting))

    def _run(self) -> None:
        try:
            while True:
                admitted: list[_Sequence] = []
                with self._cond:
                    while not self._stop and not self._rows and not self._waiting and not self._aborts:
                        self._cond.wait(self._idle_wait_s)
                    if self._stop:
                        break
                    aborts, self._aborts = self._aborts, set()
                    if aborts:
                        self._waiting = collections.deque(s for s in self._waiting if s.id not in aborts)
                    while self._waiting and len(self._rows) + len(admitted) < self.max_num_seqs:
                        admitted.append(self._waiting.popleft())
                    self._set_gauges()
                if aborts:
                    for s in self._rows:
                        if s.id in aborts:
                            s.finished = True
                            if self.metrics:
                                self.metrics.of(self.metrics.aborted).inc()
                    self._drop_finished()
                self._admitted = admitted  # so that a crash below still answers them
                for group in self._prefill_groups(admitted):
                    self._prefill(group)
                self._admitted = []
                if self._rows:
                    self._decode_step()
                with self._cond:
                    self._set_gauges()
        except BaseException as e:  # a bug: fail every request loudly, tell the owner
            self.error = e
            with self._cond:
                pending = [s for s in self._admitted if not s.finished] + list(self._rows) + list(self._waiting)
                self._admitted = []
                self._rows, self._waiting = [], collections.deque()
            for s in pending:
                self._send(s, e)
            if self.on_death is not None:
                self.on_death(e)
            raise
        finally:
            with self._cond:
                pending = list(self._rows) + list(self._waiting)
                self._rows, self._waiting = [], collections.deque()
            for s in pending:
                self._send(s, EngineDead("the engine stopped"))

    def _fail(self, seqs: list[_Sequence], e: BaseException) -> None:
        """End these requests with an error; the engine goes on."""
        for seq in seqs:
            if not seq.finished:
                seq.finished = True
                if self.metrics:
                    self.metrics.of(self.metrics.failed).inc()
                self._send(seq, RequestFailed(f"{type(e).__name__}: {e}"))

    def _emit(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Sample the next token of `seq` and send it; a failure ends that request alone."""
        try:
            self._sample(seq, logits)
        except Exception as e:  # noqa: BLE001  one request's arithmetic or parameters
            self._fail([seq], e)

    def _sample(self, seq: _Sequence, logits: np.ndarray) -> None:
        p = seq.params
        n_out = len(seq.output_ids)
        banned = p.stop_token_ids if n_out < p.min_tokens else ()
        token = next_token(logits, p, seq.rng, banned=banned)
        logprob = float(log_softmax(logits)[token]) if p.logprobs is not None else None
        top = top_logprobs(logits, p.logprobs) if p.logprobs else None
        seq.output_ids.append(token)
        now = time.perf_counter()
        if seq.first_token_time is None:
            seq.first_token_time = now
        finish = None
        if token in p.stop_token_ids and not p.ignore_eos:
            finish = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.length + 1 >= self.max_model_len:
            finish = "length"
        if finish:
            seq.finished = True
            self._record_finish(seq, finish, now)
        if self.metrics:
            self.metrics.of(self.metrics.generation_tokens).inc()
        self._send(seq, TokenEvent(token, logprob, top, finish))

    def _send(self, seq: _Sequence, event: TokenEvent | BaseException) -> None:
        """Deliver to the request's sink; a failing sink (its consumer gone) ends that sequence only."""
        try:
            seq.sink(event)
        except Exception:
            seq.finished = True

    def _record_finish(self, seq: _Sequence, reason: str, now: float) -> None:
        m = self.metrics
        if not m:
            return
        m.of(m.finished, finished_reason=reason).inc()
        m.of(m.e2e).observe(now - seq.arrival)
        if len(seq.output_ids) > 1 and seq.first_token_time is not None:
            m.of(m.tpot).observe((now - seq.first_token_time) / (len(seq.output_ids) - 1))

    def _prefill_groups(self, seqs: list[_Sequence]) -> Iterator[list[_Sequence]]:
        """Admitted sequences in prefill batches of at most `max_prefill_tokens` padded tokens."""
        group: list[_Sequence] = []
        width = 0
        for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):  # neighbours in length pad little
            n = len(seq.prompt_ids)
            if group and max(width, n) * (len(group) + 1) > self.max_prefill_tokens:
                yield group
                group, width = [], 0
            group.append(seq)
            width = max(width, n)
        if group:
            yield group

    def _prefill(self, seqs: list[_Sequence]) -> None:
        """Left-padded graph calls for `seqs` (in column chunks); sample their first tokens; join the survivors."""
        t0 = time.perf_counter()
        ids, mask = left_pad([s.prompt_ids for s in seqs], pad_id=0)  # pad rows are masked out
        pos = positions(mask)
        batch, width = ids.shape
        chunk = max(1, self.max_prefill_tokens // batch)
        try:
            past: dict[str, Any] = self.model.empty_past(batch)
            for start in range(0, width, chunk):
                end = min(width, start + chunk)
                # a chunk's queries attend to the cache of earlier chunks: mask covers [0, end)
                logits, present = self.model.forward(ids[:, start:end], mask[:, :end], pos[:, start:end], past, True)
                past = past_from_present(present)
        except Exception as e:  # noqa: BLE001  this prefill's requests fail, the running batch goes on
            self._fail(seqs, e)
            return
        finally:
            if self.after_prefill is not None:
                self.after_prefill(int(ids.size))
        elapsed = time.perf_counter() - t0
        for r, seq in enumerate(seqs):
            seq.length = len(seq.prompt_ids)
            if self.metrics:
                m = self.metrics
                m.of(m.prefill_time).observe(elapsed)
                m.of(m.queue_time).observe(t0 - seq.arrival)
                m.of(m.prompt_tokens).inc(seq.length)
            self._emit(seq, logits[r, -1])
            if self.metrics:
                self.metrics.of(self.metrics.ttft).observe(time.perf_counter() - seq.arrival)
        joining = [(r, s) for r, s in enumerate(seqs) if not s.finished]
        if joining:
            self._join(past, mask, joining)

    def _join(self, past: dict[str, Any], mask: np.ndarray, joining: list[tuple[int, _Sequence]]) -> None:
        """Add prefilled rows (`past` and `mask` of one prefill call, row index per sequence) to the batch."""
        new_rows = [s for _, s in joining]
        if not self._rows and len(joining) == mask.shape[0]:
            # the prefill batch becomes the running batch as it is (OrtValues stay in ORT)
            self._rows, self._past, self._mask = new_rows, past, mask
            return
        b_old = len(self._rows)
        p_old = self._mask.shape[1] if b_old else 0
        p_new = max([p_old] + [s.length for s in new_rows])
        width = mask.shape[1]
        merged = {}
        for name, arr in past.items():
            arr = _array(arr)
            _, h, _, d = arr.shape
            out = np.zeros((b_old + len(new_rows), h, p_new, d), dtype=arr.dtype)
            if b_old:
                out[:b_old, :, p_new - p_old:, :] = _array(self._past[name])
            for i, (r, seq) in enumerate(joining):
                out[b_old + i, :, p_new - seq.length:, :] = arr[r, :, width - seq.length:, :]
            merged[name] = out
        new_mask = np.zeros((b_old + len(new_rows), p_new), dtype=np.int64)
        if b_old:
            new_mask[:b_old, p_new - p_old:] = self._mask
        for i, seq in enumerate(new_rows):
            new_mask[b_old + i, p_new - seq.length:] = 1
        self._rows = self._rows + new_rows
        self._past, self._mask = merged, new_mask

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self._rows) if not s.finished]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._past = [], {}
            self._mask = np.zeros((0, 0), dtype=np.int64)
            return
        rows = [self._rows[i] for i in keep]
        p_old = self._mask.shape[1]
        p_new = max(s.length for s in rows)  # columns left of this are padding in every kept row
        cut = p_old - p_new
        idx = np.asarray(keep)
        self._past = {k: np.ascontiguousarray(_array(v)[idx, :, cut:, :]) for k, v in self._past.items()}
        self._mask = np.ascontiguousarray(self._mask[idx, cut:])
        self._rows = rows

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        rows = self._rows
        ids = np.asarray([[s.output_ids[-1]] for s in rows], dtype=np.int64)
        pos = np.asarray([[s.length] for s in rows], dtype=np.int64)
        mask = np.concatenate([self._mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
        try:
            logits, present = self.model.forward(ids, mask, pos, self._past, True)
        except Exception as e:  # noqa: BLE001  the batch's cache is unusable: fail its requests, go on
            self._fail(rows, e)
            self._rows, self._past = [], {}
            self._mask = np.zeros((0, 0), dtype=np.int64)
            return
        self._past = past_from_present(present)
        self._mask = mask
        if self.metrics:
            m = self.metrics
            m.of(m.step_time).observe(time.perf_counter() - t0)
            m.of(m.batch_size).observe(len(rows))
        for b, seq in enumerate(rows):
            seq.length += 1
            self._emit(seq, logits[b, -1])
        self._drop_finished()
