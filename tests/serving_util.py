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


def concurrent_streams(base_url: str, model: str, prompts: list[str], lens: list[int],
                       timeout: float = 120) -> list[tuple[str, int, int | None]]:
    """Stream every prompt at once through the official async openai client (greedy, ignore_eos).

    Returns (text, content chunks, usage.completion_tokens) per prompt, in order.
    """
    import asyncio

    import openai

    async def one(ac, p, n):
        stream = await ac.completions.create(model=model, prompt=p, max_tokens=n, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, chunks, usage = "", 0, None
        async for c in stream:
            if c.choices:
                text, chunks = text + c.choices[0].text, chunks + 1
            if c.usage:
                usage = c.usage.completion_tokens
        return text, chunks, usage

    async def main():
        ac = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=timeout)
        return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lens)))

    return asyncio.run(main())
