"""A tiny numpy language model with the graph call of either ONNX graph form, for engine unit tests.

It is a real (random-weight) attention model: learned position embeddings, layers with
different KV-head counts and one layer without attention, causal attention. ``TinyNumpyLM``
has the past-present call (attention mask honoured), so left padding, per-row positions and
cache splitting are exercised exactly as with the ONNX model; ``TinyNumpyGqaLM`` computes the
same function through the gqa call (buffers updated in place, right-padded chunks, rows that
sit a call out), without an export. ``delay`` slows every graph call (requests still running).
"""

from __future__ import annotations

import time

import numpy as np


class TinyNumpyLM:
    attention = "past-present"

    def __init__(self, vocab: int = 64, d: int = 32, kv_heads: tuple[int, ...] = (2, 0, 1), head_dim: int = 8,
                 max_pos: int = 256, seed: int = 0, delay: float = 0.0):
        rng = np.random.default_rng(seed)
        f = np.float32
        self.delay, self.max_length = delay, max_pos
        self.vocab, self.head_dim, self.kv_heads = vocab, head_dim, kv_heads
        self.emb = rng.normal(size=(vocab, d)).astype(f)
        self.pos = (0.5 * rng.normal(size=(max_pos, d))).astype(f)
        self.layers = []
        for h in kv_heads:
            if h == 0:
                self.layers.append(None)
                continue
            w = lambda *s: (rng.normal(size=s) / np.sqrt(s[0])).astype(f)  # noqa: E731
            self.layers.append((w(d, h * head_dim), w(d, h * head_dim), w(d, h * head_dim), w(h * head_dim, d)))
        self.out = (2.0 * rng.normal(size=(d, vocab)) / np.sqrt(d)).astype(f)
        self.calls: list[tuple[int, int]] = []  # (batch, seq) of each forward, for tests

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        past = {}
        for i, h in enumerate(self.kv_heads):
            if h:
                for kind in ("key", "value"):
                    past[f"past_key_values.{i}.{kind}"] = np.zeros((batch, h, 0, self.head_dim), np.float32)
        return past

    def _called(self, input_ids) -> None:
        self.calls.append(tuple(np.shape(input_ids)))
        if self.delay:
            time.sleep(self.delay)

    def _project(self, x, i: int):
        """Layer i's q, k, v [b, kv_heads_i, s, head_dim] and output weight; None for a layer without attention."""
        if self.layers[i] is None:
            return None
        b, s = x.shape[:2]
        wq, wk, wv, wo = self.layers[i]
        split = lambda t: t.reshape(b, s, self.kv_heads[i], self.head_dim).transpose(0, 2, 1, 3)  # noqa: E731
        return split(x @ wq), split(x @ wk), split(x @ wv), wo

    def _attend(self, q, k, v, allowed):
        scores = np.where(allowed, q @ np.swapaxes(k, -1, -2) / np.sqrt(self.head_dim), -1e30)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v

    def _layers(self, x, attention):
        """The residual stream through every layer; ``attention(i, q, k, v)`` is layer i's attention output."""
        for i in range(len(self.layers)):
            projected = self._project(x, i)
            if projected is None:
                x = x + 0.1 * np.tanh(x)
                continue
            q, k, v, wo = projected
            b, s = x.shape[:2]
            x = x + attention(i, q, k, v).transpose(0, 2, 1, 3).reshape(b, s, -1) @ wo
        return x

    def forward(self, input_ids, attention_mask, position_ids, past, last_only=False):
        b, s = input_ids.shape
        self._called(input_ids)
        present = {}

        def attention(i, q, k, v):
            k = np.concatenate([past[f"past_key_values.{i}.key"], k], axis=2)
            v = np.concatenate([past[f"past_key_values.{i}.value"], v], axis=2)
            present[f"present.{i}.key"], present[f"present.{i}.value"] = k, v
            t = k.shape[2]
            causal = np.arange(t)[None, :] <= (t - s + np.arange(s))[:, None]
            allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
            return self._attend(q, k, v, allowed)

        x = self._layers(self.emb[input_ids] + self.pos[position_ids], attention)
        if last_only:
            x = x[:, -1:]
        return (x @ self.out).astype(np.float32), present


class TinyNumpyGqaLM(TinyNumpyLM):
    """TinyNumpyLM's function through the gqa form's call (exporters/onnx/batch.py)."""

    attention = "gqa"

    def kv_buffers(self, rows: int, capacity: int) -> dict[str, np.ndarray]:
        return {f"{i}.{kind}": np.zeros((rows, h, capacity, self.head_dim), np.float32)
                for i, h in enumerate(self.kv_heads) if h for kind in ("key", "value")}

    def run_rows(self, kv, lo, hi, input_ids, seqlens_k, query_seqlens, logits_index):
        b, s = input_ids.shape
        assert b == hi - lo and len(seqlens_k) == len(query_seqlens) == len(logits_index) == b
        self._called(input_ids)
        before = seqlens_k + 1 - query_seqlens  # tokens each row held before the call
        pos = np.minimum(before[:, None] + np.arange(s)[None, :], self.pos.shape[0] - 1)

        def attention(i, q, k, v):
            keys, values = kv[f"{i}.key"][lo:hi], kv[f"{i}.value"][lo:hi]  # views: written in place
            out = np.zeros_like(q)
            for r in range(b):
                n, start = int(query_seqlens[r]), int(before[r])
                if not n:
                    continue  # sits the call out: its cache is not touched
                keys[r, :, start:start + n] = k[r, :, :n]
                values[r, :, start:start + n] = v[r, :, :n]
                t = start + n
                causal = np.arange(t)[None, :] <= (start + np.arange(n))[:, None]
                out[r, :, :n] = self._attend(q[r, :, :n], keys[r, :, :t], values[r, :, :t], causal[None])
            return out

        x = self._layers(self.emb[input_ids] + self.pos[pos], attention)
        picked = np.take_along_axis(x, logits_index[:, :, None], axis=1)
        return (picked @ self.out).astype(np.float32)


FAKES = {"past-present": TinyNumpyLM, "gqa": TinyNumpyGqaLM}


class SaturatingServer:
    """A server simulated in event time, of known saturation: ``slots`` requests at once, each taking
    ``prefill_s`` to its first token and ``tpot_s`` per further token; arrivals beyond a free slot wait
    in order. It saturates at ``slots / (prefill_s + (output_tokens - 1) × tpot_s)`` requests/s."""

    def __init__(self, slots: int = 2, prefill_s: float = 0.05, tpot_s: float = 0.01, output_tokens: int = 6):
        self.slots, self.prefill_s, self.tpot_s, self.output_tokens = slots, prefill_s, tpot_s, output_tokens

    @property
    def service_s(self) -> float:
        return self.prefill_s + (self.output_tokens - 1) * self.tpot_s

    @property
    def saturation(self) -> float:
        return self.slots / self.service_s

    def run(self, arrivals: np.ndarray) -> tuple[list, float]:
        """Per-request results (``bench.RequestResult``) and the run's duration for requests sent at ``arrivals``."""
        import heapq

        from serving.measure.bench import RequestResult

        free = [0.0] * self.slots
        results, end = [], 0.0
        for t in arrivals:
            start = max(float(t), heapq.heappop(free))
            done = start + self.service_s
            heapq.heappush(free, done)
            end = max(end, done)
            results.append(RequestResult(success=True, ttft=start - t + self.prefill_s, latency=done - t,
                                         itl=[self.tpot_s] * (self.output_tokens - 1), prompt_len=8,
                                         output_tokens=self.output_tokens, start_time=float(t)))
        return results, end
