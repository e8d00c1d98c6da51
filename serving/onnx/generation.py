"""What both endpoints share: a request's sequences through the engine, stop strings, the whole response
or its SSE stream, usage. Each endpoint (``completions.py``, ``chat.py``) supplies what differs: how a
request becomes prompts, and how a choice and a streamed delta are written (an ``Endpoint``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from flap_deploy.generation.sampling import SamplingParams
from serving.onnx.engine import TokenEvent
from serving.onnx.errors import ApiError
from serving.onnx.server import OnnxServer


@dataclass
class Choice:
    index: int
    prompt: list[int]
    params: SamplingParams
    request_id: int | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # final (stop-string-truncated) text decoded so far
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    events: list[TokenEvent] = field(default_factory=list)


class Endpoint:
    """One OpenAI endpoint: its path and request schema, how a request becomes choices, how they are written."""

    path: str
    request_class: type[BaseModel]
    id_prefix: str
    object: str
    chunk_object: str

    async def choices(self, server: OnnxServer, body: Any) -> tuple[list[list[int]], list[Choice]]:
        """The request's distinct prompts (counted once in usage) and its choices, each with its sampling."""
        raise NotImplementedError

    def choice(self, server: OnnxServer, ch: Choice) -> dict[str, Any]:
        """A finished choice in the whole (non-streamed) response."""
        raise NotImplementedError

    def delta(self, server: OnnxServer, ch: Choice, text: str, ev: TokenEvent, first: bool) -> dict[str, Any]:
        """A choice in one streamed chunk: ``text`` is what may be sent now; ``first`` for its first chunk."""
        raise NotImplementedError


async def handle(server: OnnxServer, request: Request, endpoint: Endpoint) -> Any:
    """The endpoint's answer: the whole response, or a StreamingResponse of SSE chunks."""
    body = await server.parse(request, endpoint.request_class)
    prompts, choices = await endpoint.choices(server, body)
    run = _Run(server, request, endpoint, body, choices, [len(p) for p in prompts])
    run.submit()
    if not body.stream:
        return await run.whole()
    return StreamingResponse(run.stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sampling(server: OnnxServer, body: Any, prompt_len: int, max_tokens: int | None, logprobs: int | None,
             seed_offset: int) -> SamplingParams:
    """One choice's sampling parameters; 400 when its prompt and output cannot fit the context."""
    limit = server.max_model_len
    if max_tokens is None:
        max_tokens = limit - prompt_len
    if max_tokens <= 0:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    if prompt_len + max_tokens > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the "
                            "completion). Please reduce the length of the messages or completion.",
                       param="max_tokens")
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0),
        seed=None if body.seed is None else body.seed + seed_offset, stop_token_ids=server.eos_token_ids,
        ignore_eos=body.ignore_eos, min_tokens=min(body.min_tokens, max_tokens), logprobs=logprobs)


def choices_for(server: OnnxServer, body: Any, prompts: list[list[int]], max_tokens: int | None,
                logprobs: int | None) -> list[Choice]:
    """``body.n`` choices per prompt, numbered in order; each choice's seed is the request's plus its index."""
    out: list[Choice] = []
    for p in prompts:
        for _ in range(body.n):
            i = len(out)
            out.append(Choice(index=i, prompt=p, params=sampling(server, body, len(p), max_tokens, logprobs, i)))
    return out


class _Run:
    """One request's choices in the engine, from admission to the last token (or its cut)."""

    def __init__(self, server: OnnxServer, request: Request, endpoint: Endpoint, body: Any, choices: list[Choice],
                 prompt_lens: list[int]):
        self.server, self.request, self.endpoint, self.body = server, request, endpoint, body
        self.choices, self.prompt_lens = choices, prompt_lens
        self.out: asyncio.Queue = asyncio.Queue()
        self.stop = body.stop_list()
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string's prefix waits
        self.id = endpoint.id_prefix + uuid.uuid4().hex
        self.created = int(time.time())

    def submit(self) -> None:
        loop = asyncio.get_running_loop()
        ids = self.server.submit_all([c.prompt for c in self.choices], [c.params for c in self.choices],
                                     [_sink(loop, self.out, c.index) for c in self.choices])
        for ch, rid in zip(self.choices, ids):
            ch.request_id = rid

    def abort(self) -> None:
        self.server.abort([c.request_id for c in self.choices if c.request_id is not None and c.finish_reason is None])

    async def tokens(self) -> AsyncIterator[tuple[Choice, TokenEvent, str]]:
        """(choice, event, text that may be sent now) for every token until every choice finished."""
        unfinished = lambda: any(c.finish_reason is None for c in self.choices)  # noqa: E731
        async for i, ev in self.server.events(self.out, unfinished, self.request):
            ch = self.choices[i]
            if ch.finish_reason is None:  # else: produced after a stop string, before the abort landed
                yield ch, ev, self._advance(ch, ev)

    def _advance(self, ch: Choice, ev: TokenEvent) -> str:
        """Add one token to a choice; return the text that may be sent now."""
        ch.token_ids.append(ev.token_id)
        ch.events.append(ev)
        full = self.server.tokenizer.decode(ch.token_ids, skip_special_tokens=True)
        finished = ev.finish_reason is not None
        if self.stop:
            start = max(0, len(ch.text) - max(len(s) for s in self.stop))
            hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                full, finished = full[: min(hits)], True
                ch.finish_reason = "stop"
                if ev.finish_reason is None:
                    self.server.engine.abort(ch.request_id)
        if ev.finish_reason and ch.finish_reason is None:
            ch.finish_reason = ev.finish_reason
        ch.text = full
        # hold back an incomplete UTF-8 character and a possible stop-string prefix
        end = len(full)
        if not finished:
            end = len(full.rstrip("\ufffd"))  # a character whose bytes are still arriving
            end = max(ch.sent, end - self.hold)
        delta = full[ch.sent:end]
        ch.sent = max(ch.sent, end)
        return delta

    def usage(self) -> dict[str, int]:
        prompt = sum(self.prompt_lens)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.model_name,
                "choices": choices}

    async def whole(self) -> dict[str, Any]:
        try:
            async for _ in self.tokens():
                pass
        finally:
            self.abort()
        return {**self.envelope(self.endpoint.object, [self.endpoint.choice(self.server, c) for c in self.choices]),
                "usage": self.usage()}

    async def stream(self) -> AsyncIterator[str]:
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        started: set[int] = set()
        try:
            async for ch, ev, text in self.tokens():
                chunk = self.envelope(self.endpoint.chunk_object,
                                      [self.endpoint.delta(self.server, ch, text, ev, ch.index not in started)])
                started.add(ch.index)
                if not include_usage and all(c.finish_reason is not None for c in self.choices):
                    chunk["usage"] = self.usage()  # the last chunk
                yield _sse(chunk)
            if include_usage:
                yield _sse({**self.envelope(self.endpoint.chunk_object, []), "usage": self.usage()})
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield _sse(e.body())
            yield "data: [DONE]\n\n"
        finally:
            # a client that went away cancels this generator: free its engine slots
            self.abort()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _sink(loop: asyncio.AbstractEventLoop, out: asyncio.Queue, index: int):
    """Engine-thread callback that hands an event to the request's event loop (never blocks)."""

    def put(event: Any) -> None:
        try:
            loop.call_soon_threadsafe(out.put_nowait, (index, event))
        except RuntimeError:  # the loop is closed: nobody is waiting for this request any more
            pass

    return put
