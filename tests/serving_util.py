"""Helpers for serving tests: a tokenizer with a chat template, and a uvicorn server in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def tiny_tokenizer(save_to: Path | None = None):
    """The ONNX tests' word-level tokenizer (w0..w125, <unk>, </s>) plus a chat template."""
    from onnx_helpers import tiny_tokenizer as word_tokenizer

    tok = word_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    if save_to is not None:
        tok.save_pretrained(save_to)
    return tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app, port: int | None = None) -> Iterator[str]:
    """Run a FastAPI app with uvicorn in a thread; yield its base URL (…/v1)."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(15)
