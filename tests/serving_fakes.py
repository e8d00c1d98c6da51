"""A tiny numpy language model on the ONNX KV-cache contract, for engine unit tests.

It is a real (random-weight) attention model: learned position embeddings, layers with
different KV-head counts and one layer without attention, causal attention that honours the
attention mask. So left padding, per-row positions and cache splitting are exercised exactly
as with the ONNX model, without an export.
"""

from __future__ import annotations

import numpy as np


class TinyNumpyLM:
    def __init__(self, vocab: int = 64, d: int = 32, kv_heads: tuple[int, ...] = (2, 0, 1), head_dim: int = 8,
                 max_pos: int = 256, seed: int = 0):
        rng = np.random.default_rng(seed)
        f = np.float32
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

    def forward(self, input_ids, attention_mask, position_ids, past, last_only=False):
        b, s = input_ids.shape
        self.calls.append((b, s))
        x = self.emb[input_ids] + self.pos[position_ids]
        present = {}
        for i, layer in enumerate(self.layers):
            if layer is None:
                x = x + 0.1 * np.tanh(x)
                continue
            wq, wk, wv, wo = layer
            h, hd = self.kv_heads[i], self.head_dim
            split = lambda t: t.reshape(b, s, h, hd).transpose(0, 2, 1, 3)  # noqa: E731
            q, k, v = split(x @ wq), split(x @ wk), split(x @ wv)
            k = np.concatenate([past[f"past_key_values.{i}.key"], k], axis=2)
            v = np.concatenate([past[f"past_key_values.{i}.value"], v], axis=2)
            present[f"present.{i}.key"], present[f"present.{i}.value"] = k, v
            t = k.shape[2]
            scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)  # [b, h, s, t]
            causal = np.arange(t)[None, :] <= (t - s + np.arange(s))[:, None]
            allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)
            scores = np.where(allowed, scores, -1e30)
            scores = scores - scores.max(-1, keepdims=True)
            p = np.exp(scores)
            p = p / p.sum(-1, keepdims=True)
            x = x + (p @ v).transpose(0, 2, 1, 3).reshape(b, s, h * hd) @ wo
        if last_only:
            x = x[:, -1:]
        return (x @ self.out).astype(np.float32), present


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
