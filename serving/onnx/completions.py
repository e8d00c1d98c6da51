"""POST /v1/completions: prompts as text or token ids, ``n`` choices per prompt, OpenAI's text logprobs."""

from __future__ import annotations

import asyncio
from typing import Any

from serving.onnx.engine import TokenEvent
from serving.onnx.errors import ApiError
from serving.onnx.generation import Choice, Endpoint, choices_for
from serving.onnx.schemas import CompletionRequest
from serving.onnx.server import OnnxServer


class Completions(Endpoint):
    path = "/v1/completions"
    request_class = CompletionRequest
    id_prefix = "cmpl-"
    object = chunk_object = "text_completion"

    async def choices(self, server: OnnxServer, body: CompletionRequest) -> tuple[list[list[int]], list[Choice]]:
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompts = await asyncio.to_thread(prompt_ids, server.tokenizer, body)  # off the event loop
        return prompts, choices_for(server, body, prompts, body.max_tokens, body.logprobs)

    def choice(self, server: OnnxServer, ch: Choice) -> dict[str, Any]:
        return {"index": ch.index, "text": ch.text, "logprobs": logprobs(server, ch.events, ch.params.logprobs),
                "finish_reason": ch.finish_reason}

    def delta(self, server: OnnxServer, ch: Choice, text: str, ev: TokenEvent, first: bool) -> dict[str, Any]:
        return {"index": ch.index, "text": text, "logprobs": logprobs(server, [ev], ch.params.logprobs),
                "finish_reason": ch.finish_reason}


def prompt_ids(tokenizer: Any, body: CompletionRequest) -> list[list[int]]:
    """The request's prompts as token ids, each non-empty and inside the vocabulary."""
    p = body.prompt
    if isinstance(p, str):
        prompts = [tokenizer.encode(p)]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [tokenizer.encode(x) for x in p]
    elif p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
    vocab = len(tokenizer)
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return prompts


def logprobs(server: OnnxServer, events: list[TokenEvent], k: int | None) -> dict[str, Any] | None:
    """OpenAI's completion logprobs of ``events`` (None when not asked for); offsets count from the first."""
    if k is None:
        return None
    tokens, lps, tops, offsets, offset = [], [], [], [], 0
    for ev in events:
        t = server.token_text(ev.token_id)
        tokens.append(t)
        lps.append(ev.logprob)
        tops.append({server.token_text(i): lp for i, lp in (ev.top_logprobs or [])} if k else None)
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
