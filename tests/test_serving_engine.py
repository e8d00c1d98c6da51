"""Continuous batching engine on numpy models of both graph forms: batched == alone, limits, aborts."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
from serving_fakes import FAKES

from flap_deploy.generation.sampling import SamplingParams
from serving.onnx.engine import Engine, QueueFull
from serving.onnx.prometheus import ServerMetrics


def _collect(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[int, queue.Queue]:
    q: queue.Queue = queue.Queue()
    rid = engine.submit(prompt, params, q.put)
    return rid, q


def _drain(q: queue.Queue, timeout: float = 30.0) -> tuple[list[int], str]:
    out = []
    while True:
        ev = q.get(timeout=timeout)
        if isinstance(ev, BaseException):
            raise ev
        out.append(ev.token_id)
        if ev.finish_reason:
            return out, ev.finish_reason


def _reference(model, prompt: list[int], n: int) -> list[int]:
    """Greedy generation without cache: the whole sequence re-run at every step (past-present call)."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        a = np.asarray([ids], dtype=np.int64)
        logits, _ = model.forward(a, np.ones_like(a), np.arange(len(ids))[None], model.empty_past(1))
        out.append(int(np.argmax(logits[0, -1])))
        ids.append(out[-1])
    return out


@pytest.fixture(params=list(FAKES))
def model(request):
    return FAKES[request.param]()


def test_batched_equals_alone_and_reference(model):
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(0, 64, size=int(rng.integers(1, 20)))) for _ in range(12)]
    lens = [int(rng.integers(1, 15)) for _ in prompts]
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0)  # noqa: E731
    engine = Engine(model, max_model_len=64, max_num_seqs=5).start()
    try:
        alone = []
        for p, n in zip(prompts, lens):
            alone.append(_drain(_collect(engine, p, greedy(n))[1])[0])
        model.calls.clear()
        qs = [_collect(engine, p, greedy(n))[1] for p, n in zip(prompts, lens)]
        together = [_drain(q)[0] for q in qs]
    finally:
        engine.shutdown()
    assert together == alone
    assert [len(t) for t in together] == lens
    assert max(b for b, s in model.calls if s == 1) > 1  # decode steps really were batched
    assert max(b for b, s in model.calls if s > 1) > 1  # and so were prefills (left-padded)
    assert max(b for b, s in model.calls) <= 5
    for p, n, out in zip(prompts[:3], lens, together):
        assert out == _reference(model, p, n)


def test_prefill_batches_respect_the_token_budget(model):
    rng = np.random.default_rng(2)
    prompts = [list(rng.integers(0, 64, size=int(n))) for n in (3, 17, 9, 30, 12, 5)]
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    alone = [_reference(model, p, 4) for p in prompts]
    engine = Engine(model, max_model_len=64, max_num_seqs=8, max_prefill_tokens=40).start()
    gate = threading.Event()
    try:
        # a sink that blocks the engine thread lets all six prompts queue up for one admission
        engine.submit([1], SamplingParams(max_tokens=1, temperature=0.0), lambda ev: gate.wait(10))
        for _ in range(100):
            if engine.stats()["waiting"] == 0:
                break
            time.sleep(0.01)
        model.calls.clear()
        qs = [_collect(engine, p, greedy)[1] for p in prompts]
        gate.set()
        outs = [_drain(q)[0] for q in qs]
    finally:
        gate.set()
        engine.shutdown()
    assert outs == alone
    prefills = [(b, s) for b, s in model.calls if s > 1]
    assert sum(b for b, _ in prefills) == len(prompts)
    assert all(b * s <= 40 or b == 1 for b, s in prefills)
    assert any(b > 1 for b, _ in prefills)


def test_seeded_sampling_is_reproducible_in_a_batch(model):
    engine = Engine(model, max_model_len=64, max_num_seqs=4).start()
    try:
        params = lambda: SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)  # noqa: E731
        alone = _drain(_collect(engine, [1, 2, 3], params())[1])[0]
        qs = [_collect(engine, [1, 2, 3], params())[1] for _ in range(3)]
        qs.append(_collect(engine, [5, 6], SamplingParams(max_tokens=20, temperature=1.0))[1])
        outs = [_drain(q)[0] for q in qs]
    finally:
        engine.shutdown()
    assert outs[0] == outs[1] == outs[2] == alone


def test_stop_token_min_tokens_and_ignore_eos(model):
    engine = Engine(model, max_model_len=64).start()
    try:
        free = _drain(_collect(engine, [3, 4], SamplingParams(max_tokens=10, temperature=0.0))[1])[0]
        eos = free[2]
        stopped, reason = _drain(_collect(engine, [3, 4], SamplingParams(
            max_tokens=10, temperature=0.0, stop_token_ids=(eos,)))[1])
        assert stopped == free[: free.index(eos) + 1] and reason == "stop"
        ignored, reason = _drain(_collect(engine, [3, 4], SamplingParams(
            max_tokens=10, temperature=0.0, stop_token_ids=(eos,), ignore_eos=True))[1])
        assert ignored == free and reason == "length"
        at_least, _ = _drain(_collect(engine, [3, 4], SamplingParams(
            max_tokens=10, temperature=0.0, stop_token_ids=(eos,), min_tokens=5))[1])
        assert len(at_least) >= 5 and eos not in at_least[:5]
    finally:
        engine.shutdown()


def test_a_sequence_that_fills_its_row_to_max_model_len_ends_with_length(model):
    engine = Engine(model, max_model_len=16, max_num_seqs=2).start()
    try:
        prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7, 7]]  # the first fills its 16 tokens exactly
        params = SamplingParams(max_tokens=16 - len(prompts[0]), temperature=0.0, ignore_eos=True)
        qs = [_collect(engine, p, params)[1] for p in prompts]  # together: the full row runs beside another
        got = [_drain(q) for q in qs]
        assert engine.alive and engine.stats() == {"running": 0, "waiting": 0}
    finally:
        engine.shutdown()
    assert [reason for _, reason in got] == ["length", "length"]
    assert [out for out, _ in got] == [_reference(model, p, 6) for p in prompts]


def test_context_limit_and_queue_bound(model):
    engine = Engine(model, max_model_len=16, max_num_seqs=1, max_queue=2)
    with pytest.raises(ValueError, match="context length"):
        engine.submit([1] * 10, SamplingParams(max_tokens=7), lambda ev: None)
    engine.start()
    gate = threading.Event()
    try:
        # a sink that blocks the engine thread keeps the queue from draining
        first = engine.submit([1], SamplingParams(max_tokens=3, temperature=0.0), lambda ev: gate.wait(10))
        for _ in range(100):  # until the engine took it (and blocks in its sink)
            if engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0:
                break
            time.sleep(0.01)
        engine.submit([1], SamplingParams(max_tokens=2), lambda ev: None)
        engine.submit([1], SamplingParams(max_tokens=2), lambda ev: None)
        with pytest.raises(QueueFull):
            engine.submit([1], SamplingParams(max_tokens=2), lambda ev: None)
        assert first
    finally:
        gate.set()
        engine.shutdown()


def test_abort_frees_the_slot(model):
    metrics = ServerMetrics("tiny")
    engine = Engine(model, max_model_len=200, max_num_seqs=1, metrics=metrics).start()
    try:
        rid, q = _collect(engine, [1, 2], SamplingParams(max_tokens=150, temperature=0.0))
        q.get(timeout=10)
        engine.abort(rid)
        out, reason = _drain(_collect(engine, [4], SamplingParams(max_tokens=3, temperature=0.0))[1])
        assert len(out) == 3 and reason == "length"
        assert engine.stats() == {"running": 0, "waiting": 0}
        text = metrics.render().decode()
        assert 'flap:num_requests_running{model_name="tiny"} 0.0' in text
        assert 'flap:requests_aborted_total{model_name="tiny"} 1.0' in text
    finally:
        engine.shutdown()


def test_a_failing_sink_ends_only_its_sequence(model):
    engine = Engine(model, max_model_len=64, max_num_seqs=4).start()

    def broken(ev):
        raise RuntimeError("consumer gone")

    try:
        engine.submit([1, 2], SamplingParams(max_tokens=20, temperature=0.0), broken)
        out, reason = _drain(_collect(engine, [3], SamplingParams(max_tokens=6, temperature=0.0))[1])
        assert len(out) == 6 and reason == "length" and engine.alive
    finally:
        engine.shutdown()


def test_a_join_and_a_leave_mid_batch_leave_the_others_unchanged(model):
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0)  # noqa: E731
    long_prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]
    engine = Engine(model, max_model_len=64, max_num_seqs=4).start()
    try:
        alone = [_drain(_collect(engine, p, greedy(30))[1])[0] for p in long_prompts]
        gate = threading.Event()
        seen: list[int] = []

        def first(ev):  # holds the engine after the long ones' first tokens, so that a join lands mid-batch
            seen.append(ev)
            if len(seen) == 3:
                gate.wait(10)

        qs = []
        for p in long_prompts:
            q: queue.Queue = queue.Queue()
            engine.submit(p, greedy(30), lambda ev, q=q: (q.put(ev), first(ev)))
            qs.append(q)
        short = _collect(engine, [7, 7, 2], greedy(4))[1]  # joins, then leaves while the others run
        gate.set()
        together = [_drain(q)[0] for q in qs]
        assert len(_drain(short)[0]) == 4
    finally:
        gate.set()
        engine.shutdown()
    assert together == alone
    assert max(b for b, s in model.calls if s == 1) >= 3  # the long ones really decoded together


def test_gqa_rows_stay_in_place_when_others_join_and_leave():
    from serving_fakes import TinyNumpyGqaLM

    model = TinyNumpyGqaLM()
    engine = Engine(model, max_model_len=64, max_num_seqs=4)
    buffers = dict(engine.cache.kv)
    rng = np.random.default_rng(5)
    engine.start()
    try:
        for _ in range(1000):  # joins and leaves of every kind: 1-3 at a time, ragged lengths
            qs = [_collect(engine, list(rng.integers(0, 64, size=int(rng.integers(1, 12)))),
                           SamplingParams(max_tokens=int(rng.integers(1, 6)), temperature=0.0))[1]
                  for _ in range(int(rng.integers(1, 4)))]
            for q in qs:
                _drain(q)
    finally:
        engine.shutdown()
    # the cache is the buffers allocated at start, nothing re-allocated or grown
    assert all(engine.cache.kv[k] is v for k, v in buffers.items()) and engine.cache.kv.keys() == buffers.keys()
    assert not engine.cache.lengths.any() and sorted(engine._free) == [0, 1, 2, 3]
