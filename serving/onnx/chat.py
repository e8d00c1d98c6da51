"""POST /v1/chat/completions: messages through the tokenizer's chat template, ``n`` choices, the
assistant role in each choice's first streamed delta, OpenAI's chat logprobs."""

from __future__ import annotations

import asyncio
from typing import Any

from serving.onnx.engine import TokenEvent
from serving.onnx.errors import ApiError
from serving.onnx.generation import Choice, Endpoint, choices_for
from serving.onnx.schemas import ChatCompletionRequest
from serving.onnx.server import OnnxServer


class Chat(Endpoint):
    path = "/v1/chat/completions"
    request_class = ChatCompletionRequest
    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    async def choices(self, server: OnnxServer, body: ChatCompletionRequest) -> tuple[list[list[int]], list[Choice]]:
        prompt = await asyncio.to_thread(prompt_ids, server.tokenizer, body)  # off the event loop
        k = (body.top_logprobs or 0) if body.logprobs else None
        return [prompt], choices_for(server, body, [prompt], body.effective_max_tokens(), k)

    def choice(self, server: OnnxServer, ch: Choice) -> dict[str, Any]:
        return {"index": ch.index, "message": {"role": "assistant", "content": ch.text},
                "logprobs": logprobs(server, ch.events, ch.params.logprobs),
                "finish_reason": ch.finish_reason}

    def delta(self, server: OnnxServer, ch: Choice, text: str, ev: TokenEvent, first: bool) -> dict[str, Any]:
        return {"index": ch.index, "delta": {"role": "assistant", "content": text} if first else {"content": text},
                "logprobs": logprobs(server, [ev], ch.params.logprobs), "finish_reason": ch.finish_reason}


def prompt_ids(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """The conversation rendered by the chat template (text parts only), as token ids."""
    messages = []
    for i, m in enumerate(body.messages):
        if isinstance(m.content, list) and any(part.get("type") != "text" for part in m.content):
            raise ApiError(400, "only text content parts are supported", param=f"messages.{i}.content")
        messages.append({"role": m.role, "content": m.text()})
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt, tokenize=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ApiError(400, "the chat prompt is empty", param="messages")
    return ids


def logprobs(server: OnnxServer, events: list[TokenEvent], k: int | None) -> dict[str, Any] | None:
    """OpenAI's chat logprobs of ``events`` (None when not asked for)."""
    if k is None:
        return None

    def entry(tid: int, lp: float) -> dict[str, Any]:
        t = server.token_text(tid)
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

    return {"content": [dict(entry(ev.token_id, ev.logprob),
                             top_logprobs=[entry(i, lp) for i, lp in (ev.top_logprobs or [])]) for ev in events]}
