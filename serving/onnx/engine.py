"""Continuous-batching generation engine over a model of either ONNX graph form.

One engine thread owns the model session and loops over steps. Each step:
  1. drops aborted sequences (client gone, stop string seen),
  2. admits waiting requests while fewer than `max_num_seqs` run, each into a free row of the
     KV cache (the lowest): the admitted prompts are prefilled together in batches of at most
     `max_prefill_tokens` padded tokens (one graph call instead of one per prompt, so TTFT does
     not grow with every arrival); a prompt longer than that is prefilled in chunks, each
     chunk attending to the cache of the ones before, so a prefill's activations are bounded
     by configuration, not by the prompt. Only the last position's logits are computed.
     Their first tokens are sampled.
  3. runs one decode step for the whole running batch.

A failure while sampling or running one request ends that request with the error (its sink
gets the exception) and the engine goes on; a failed decode step fails the running batch
only. Anything else that escapes the loop stops the engine: `error` is set, every pending
request gets the error, and `on_death(error)` is called (the server then exits non-zero).

The KV cache is the graph form's `exporters.onnx.batch.RowCache` of `max_num_seqs` rows of
`max_model_len` tokens, a row per running sequence. gqa form: preallocated buffers that the
graph updates in place; a decode step copies no cache, and a sequence joining or leaving moves
no other sequence's cache. past-present form: the batch's cache is what the graph returns, fed
back unchanged, re-packed when a sequence joins (left-pad to the longest row) or leaves (drop
its row). Either way a row computes what it would compute alone.

The model is an `exporters.onnx.OnnxCausalLM` or anything with the same graph call for its
form (`batch.py`; the tests pass numpy fakes).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from exporters.onnx.batch import new_cache
from flap_deploy.generation.sampling import (
    SamplingParams,
    log_softmax,
    next_token,
    top_logprobs,
)


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
    row: int = -1  # its row of the KV cache while it runs
    first_token_time: float | None = None
    finished: bool = False


class Engine:
    """Continuous batching over an ONNX model of either graph form; thread-safe `submit` / `abort`."""

    def __init__(self, model: Any, *, max_model_len: int, max_num_seqs: int = 8,
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
        # the running batch: a row of the KV cache per sequence (ValueError past the graph's max_length)
        self.cache = new_cache(model, rows=max_num_seqs, capacity=max_model_len)
        self._free = list(range(max_num_seqs))  # a heap: the lowest free row first, so rows stay dense
        self._rows: list[_Sequence] = []
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
        """Prefill `seqs` into free cache rows (in graph calls of `max_prefill_tokens`); sample their first tokens."""
        t0 = time.perf_counter()
        for seq in seqs:  # consecutive rows where they are free, so one call covers the group
            seq.row = heapq.heappop(self._free)
        prompts = [s.prompt_ids for s in seqs]
        try:
            logits = self.cache.prefill([s.row for s in seqs], prompts, self.max_prefill_tokens)
        except Exception as e:  # noqa: BLE001  this prefill's requests fail, the running batch goes on
            self._fail(seqs, e)
            self._release(seqs)
            return
        finally:
            if self.after_prefill is not None:
                self.after_prefill(sum(len(p) for p in prompts))
        elapsed = time.perf_counter() - t0
        for seq, last in zip(seqs, logits):
            seq.length = len(seq.prompt_ids)
            if self.metrics:
                m = self.metrics
                m.of(m.prefill_time).observe(elapsed)
                m.of(m.queue_time).observe(t0 - seq.arrival)
                m.of(m.prompt_tokens).inc(seq.length)
            self._emit(seq, last)
            if self.metrics:
                self.metrics.of(self.metrics.ttft).observe(time.perf_counter() - seq.arrival)
        self._rows = self._rows + [s for s in seqs if not s.finished]
        self._release([s for s in seqs if s.finished])

    def _release(self, seqs: list[_Sequence]) -> None:
        """Give the cache rows of these sequences back (nothing else moves in the gqa form)."""
        held = [s for s in seqs if s.row >= 0]
        if held:
            self.cache.release([s.row for s in held])
        for seq in held:
            heapq.heappush(self._free, seq.row)
            seq.row = -1

    def _drop_finished(self) -> None:
        done = [s for s in self._rows if s.finished]
        if done:
            self._rows = [s for s in self._rows if not s.finished]
            self._release(done)

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        rows = self._rows
        try:
            logits = self.cache.decode([s.row for s in rows], [s.output_ids[-1] for s in rows])
        except Exception as e:  # noqa: BLE001  the batch's cache is unusable: fail its requests, go on
            self._fail(rows, e)
            self._rows = []
            self._release(rows)
            return
        if self.metrics:
            m = self.metrics
            m.of(m.step_time).observe(time.perf_counter() - t0)
            m.of(m.batch_size).observe(len(rows))
        for b, seq in enumerate(rows):
            seq.length += 1
            self._emit(seq, logits[b])
        self._drop_finished()
