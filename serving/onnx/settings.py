"""The ONNX Runtime server's settings: one object from the CLI (or `python -m serving.onnx`) to the engine."""

from __future__ import annotations

from dataclasses import dataclass

from flap_deploy.errors import ParameterError
from flap_deploy.streaming.memory import parse_size
from serving.settings import ServerSettings, at_least

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's


@dataclass(frozen=True)
class OnnxServerSettings(ServerSettings):
    """Sizes may be given as text (``"4M"``, ``"8G"``); they are held in bytes."""

    max_num_seqs: int = 8
    max_queue: int = 256  # waiting sequences at most; beyond it 503 (400 when one request alone asks more)
    max_prefill_tokens: int = 1024  # tokens per prefill graph call: longer prompts are prefilled in chunks
    max_request_bytes: int = 4 << 20  # larger bodies get 413 before they are read
    max_memory: int | None = None  # refuse to start when the stated budget exceeds it
    body_timeout_s: float = 30.0  # a body must arrive within it (408)
    header_timeout_s: float = 10.0  # a new connection must send its request headers within it
    shutdown_timeout_s: float = 30.0  # a SIGTERM waits this long for running requests
    threads: int | None = None  # ONNX Runtime intra-op threads [default: ORT's]
    log_level: str = "info"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_request_bytes", "max_memory"):
            object.__setattr__(self, name, parse_size(getattr(self, name), name))
        at_least("max_queue", self.max_queue, 1)
        at_least("max_prefill_tokens", self.max_prefill_tokens, 1)
        at_least("threads", self.threads, 1)
        at_least("body_timeout_s", self.body_timeout_s, 0, open_=True)
        at_least("header_timeout_s", self.header_timeout_s, 0, open_=True)
        at_least("shutdown_timeout_s", self.shutdown_timeout_s, 0)
        if self.log_level not in LOG_LEVELS:
            raise ParameterError("log_level", f"{self.log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
