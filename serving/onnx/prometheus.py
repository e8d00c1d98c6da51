"""Prometheus metrics of the ONNX Runtime server (one private registry per server).

Names follow vLLM's where a counterpart exists (`vllm:num_requests_running` becomes
`flap:num_requests_running`), so dashboards carry over.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """Counters, gauges and histograms; the engine and the HTTP layer both update them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, lab = self.registry, ["model_name"]
        self.requests = Counter("flap:requests", "HTTP requests by endpoint and status code",
                                ["model_name", "endpoint", "status"], registry=r)
        self.finished = Counter("flap:request_success", "Finished sequences by finish reason",
                                ["model_name", "finished_reason"], registry=r)
        self.prompt_tokens = Counter("flap:prompt_tokens", "Prefilled prompt tokens", lab, registry=r)
        self.generation_tokens = Counter("flap:generation_tokens", "Generated tokens", lab, registry=r)
        self.running = Gauge("flap:num_requests_running", "Sequences in the running batch", lab, registry=r)
        self.waiting = Gauge("flap:num_requests_waiting", "Sequences in the waiting queue", lab, registry=r)
        self.rejected = Counter("flap:requests_rejected", "Requests refused because the queue was full",
                                lab, registry=r)
        self.aborted = Counter("flap:requests_aborted", "Sequences aborted (client gone, stop string)",
                               lab, registry=r)
        self.failed = Counter("flap:requests_failed", "Sequences ended by an error inside the engine",
                              lab, registry=r)
        self.batch_size = Histogram("flap:decode_batch_size", "Sequences per decode step", lab,
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_time = Histogram("flap:decode_step_seconds", "Wall time of one batched decode step", lab,
                                   buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("flap:prefill_seconds", "Wall time of one prompt prefill", lab,
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("flap:request_queue_time_seconds", "Time from arrival to prefill", lab,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("flap:time_to_first_token_seconds", "Time from arrival to the first token", lab,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("flap:time_per_output_token_seconds", "Mean time per output token after the first",
                              lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("flap:e2e_request_latency_seconds", "Time from arrival to the last token", lab,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.name = model_name
        # create the unlabelled-by-request children now, so that /metrics lists them from the start
        for metric in (self.prompt_tokens, self.generation_tokens, self.running, self.waiting, self.rejected,
                       self.aborted, self.failed, self.batch_size, self.step_time, self.prefill_time, self.queue_time,
                       self.ttft, self.tpot, self.e2e):
            self.of(metric)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def of(self, metric, **labels):
        """The child of `metric` for this model (and any extra labels)."""
        return metric.labels(model_name=self.name, **labels)
