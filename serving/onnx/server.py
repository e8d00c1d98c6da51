"""OpenAI-compatible HTTP server over the continuous-batching engine (ONNX Runtime backend).

Endpoints (ARCHITECTURE.md "HTTP contract"): GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (SSE streaming or not), GET /health, GET /metrics (Prometheus).
Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}`, 500s included;
400 for requests that can never succeed, 503 (with Retry-After) only for transient overload.

Survival rules (docs/SERVING.md "Reliability"): bodies above `max_request_bytes` are refused
(413) before they are read; a body must arrive within `body_timeout_s` and headers within
`header_timeout_s`; tokenization runs off the event loop; a client that goes away frees its
engine slots at the next step (streaming or not); a request that fails inside the engine ends
alone; if the engine thread dies, /health answers 503 and the process exits non-zero. On
SIGTERM the server stops admitting (503), lets running requests finish, and shortly before
`shutdown_timeout_s` ends the rest with a final error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from flap_deploy.generation.sampling import SamplingParams
from serving.onnx.engine import Engine, EngineDead, QueueFull, TokenEvent
from serving.onnx.prometheus import ServerMetrics
from serving.onnx.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)

# ------------------------------------------------------------------------------ errors


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(status_code=self.status, headers=headers, content={"error": {
            "message": self.message, "type": self.type, "param": self.param, "code": self.code}})


class _ClientGone(Exception):
    """The client closed the connection (sent through a request's event queue)."""


class _ShuttingDown(Exception):
    """The server's graceful-stop deadline is near (sent through a request's event queue)."""


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    where = ".".join(loc)
    message = f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
    return message, (loc[0] if loc else None)  # param names the top-level field


# ------------------------------------------------------------------------------ state


@dataclass
class _Choice:
    index: int
    prompt_len: int
    request_id: int | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # final (stop-string-truncated) text decoded so far
    sent: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    logprobs: list[TokenEvent] = field(default_factory=list)


async def _watch_disconnect(request: Request, out: asyncio.Queue) -> None:
    """Put a _ClientGone into `out` when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            out.put_nowait((-1, _ClientGone()))
            return


def _sink(loop: asyncio.AbstractEventLoop, out: asyncio.Queue, index: int):
    """Engine-thread callback that hands an event to the request's event loop (never blocks)."""

    def put(event: Any) -> None:
        try:
            loop.call_soon_threadsafe(out.put_nowait, (index, event))
        except RuntimeError:  # the loop is closed: nobody is waiting for this request any more
            pass

    return put


class OnnxServer:
    """The engine, the tokenizer and the request handling behind the FastAPI app."""

    def __init__(self, model: Any, tokenizer: Any, *, model_name: str, max_model_len: int,
                 max_num_seqs: int = 8, max_queue: int = 256, api_key: str | None = None,
                 model_root: str | None = None, max_request_bytes: int = 4 << 20, max_prefill_tokens: int = 1024,
                 body_timeout_s: float = 30.0, shutdown_timeout_s: float = 30.0, after_prefill: Any = None):
        if max_request_bytes < 1 or body_timeout_s <= 0 or shutdown_timeout_s < 0:
            raise ValueError("max_request_bytes >= 1, body_timeout_s > 0 and shutdown_timeout_s >= 0 are required")
        self.max_request_bytes = max_request_bytes
        self.body_timeout_s = body_timeout_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.draining = False  # SIGTERM received: no new requests
        self.on_engine_death: Any = None  # set by serve_onnx: stop the process
        self._active: set[asyncio.Queue] = set()  # event queues of running requests
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_root = model_root
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.metrics = ServerMetrics(model_name)
        eos = set(getattr(model, "eos_token_ids", None) or ())  # the model's (generation) EOS ids
        if isinstance(getattr(tokenizer, "eos_token_id", None), int):
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.engine = Engine(model, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                             max_queue=max_queue, eos_token_ids=self.eos_token_ids, metrics=self.metrics,
                             max_prefill_tokens=max_prefill_tokens, on_death=self._engine_died,
                             after_prefill=after_prefill)
        self.created = int(time.time())

    def _engine_died(self, error: BaseException) -> None:
        import sys

        print(f"flap-deploy: the engine stopped ({type(error).__name__}: {error}); the server exits",
              file=sys.stderr, flush=True)
        if self.on_engine_death is not None:
            self.on_engine_death(error)

    # -------------------------------------------------------------- graceful stop

    def begin_drain(self) -> None:
        """SIGTERM: refuse new requests; schedule the cut of what still runs near the deadline."""
        if self.draining:
            return
        self.draining = True
        cut_after = max(0.0, self.shutdown_timeout_s - min(1.0, self.shutdown_timeout_s / 4))
        asyncio.get_running_loop().call_later(cut_after, self.cut_running)

    def cut_running(self) -> None:
        """End every running request now: each gets a final error (SSE event + [DONE], or a 503)."""
        for q in list(self._active):
            q.put_nowait((-1, _ShuttingDown()))

    # -------------------------------------------------------------- request parsing

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY').",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) past `max_request_bytes` before it is all read; within `body_timeout_s`."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        too_big = ApiError(413, f"the request body exceeds the server's limit of {limit} bytes "
                                "(--max-request-bytes)", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                           code="request_timeout") from None

    async def parse(self, request: Request, cls: type[BaseModel]) -> Any:
        if self.draining:
            raise ApiError(503, "The server is shutting down.", type_="server_error", code="shutting_down")
        raw = await self.read_body(request)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            body = cls.model_validate(data)
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply") from None
        except ValidationError as e:
            message, param = _validation_message(e)
            raise ApiError(400, message, param=param) from None
        if body.model is not None and body.model not in (self.model_name, self.model_root):
            raise ApiError(404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
        return body

    def sampling(self, body: Any, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                 seed_offset: int) -> SamplingParams:
        if max_tokens is None:
            max_tokens = self.max_model_len - prompt_len
        if max_tokens <= 0:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
        if prompt_len + max_tokens > self.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the messages, "
                                f"{max_tokens} in the completion). Please reduce the length of the messages "
                                "or completion.", param="max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        return SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),
            seed=None if body.seed is None else body.seed + seed_offset, stop_token_ids=self.eos_token_ids,
            ignore_eos=body.ignore_eos, min_tokens=min(body.min_tokens, max_tokens), logprobs=logprobs)

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            prompts = [self.tokenizer.encode(p)]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        elif p and all(isinstance(x, str) for x in p):
            prompts = [self.tokenizer.encode(x) for x in p]
        elif p and all(isinstance(x, list) for x in p):
            prompts = [list(x) for x in p]
        else:
            raise ApiError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
        vocab = len(self.tokenizer)
        for ids in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return prompts

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        messages = []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, list) and any(part.get("type") != "text" for part in m.content):
                raise ApiError(400, "only text content parts are supported", param=f"messages.{i}.content")
            messages.append({"role": m.role, "content": m.text()})
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt,
                                                  tokenize=False)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ApiError(400, "the chat prompt is empty", param="messages")
        return ids

    # -------------------------------------------------------------- generation

    def submit_all(self, prompts: list[list[int]], params: list[SamplingParams], choices: list[_Choice],
                   out: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        if len(choices) > self.engine.max_queue:  # could never be admitted: not a retry case
            raise ApiError(400, f"the request asks for {len(choices)} sequences (n x prompts); this server queues "
                                f"at most {self.engine.max_queue} (--max-queue)", param="n")
        stats = self.engine.stats()
        if stats["waiting"] + len(choices) > self.engine.max_queue:
            self.metrics.of(self.metrics.rejected).inc()
            raise ApiError(503, "The server is overloaded (waiting queue full); retry later.", type_="server_error",
                           code="overloaded")
        try:
            for ids, sp, ch in zip(prompts, params, choices):
                ch.request_id = self.engine.submit(ids, sp, _sink(loop, out, ch.index))
        except QueueFull:
            self.abort(choices)
            raise ApiError(503, "The server is overloaded (waiting queue full); retry later.",
                           type_="server_error", code="overloaded") from None
        except EngineDead:
            self.abort(choices)
            raise ApiError(503, "The engine is not running.", type_="server_error") from None

    def abort(self, choices: list[_Choice]) -> None:
        for ch in choices:
            if ch.request_id is not None and ch.finish_reason is None:
                self.engine.abort(ch.request_id)

    def advance(self, ch: _Choice, ev: TokenEvent, stop: list[str], hold: int) -> str:
        """Add one token to a choice; return the text that may be sent now."""
        ch.token_ids.append(ev.token_id)
        ch.logprobs.append(ev)
        full = self.tokenizer.decode(ch.token_ids, skip_special_tokens=True)
        finished = ev.finish_reason is not None
        if stop:
            start = max(0, len(ch.text) - max(len(s) for s in stop))
            hits = [i for i in (full.find(s, start) for s in stop) if i >= 0]
            if hits:
                full, finished = full[: min(hits)], True
                ch.finish_reason = "stop"
                if ev.finish_reason is None:
                    self.engine.abort(ch.request_id)
        if ev.finish_reason and ch.finish_reason is None:
            ch.finish_reason = ev.finish_reason
        ch.text = full
        # hold back an incomplete UTF-8 character and a possible stop-string prefix
        end = len(full)
        if not finished:
            end = len(full.rstrip("\ufffd"))  # a character whose bytes are still arriving
            end = max(ch.sent, end - hold)
        delta = full[ch.sent:end]
        ch.sent = max(ch.sent, end)
        return delta

    async def events(self, out: asyncio.Queue, choices: list[_Choice], request: Request | None
                     ) -> AsyncIterator[tuple[_Choice, TokenEvent]]:
        """Engine events until every choice finished; raise on engine failure, shutdown or a gone client.

        A watcher task answers the client's disconnect at once (not at the next token), so an
        abandoned request frees its slots within one engine step, streaming or not.
        """
        watcher = asyncio.create_task(_watch_disconnect(request, out)) if request is not None else None
        self._active.add(out)
        try:
            while any(c.finish_reason is None for c in choices):
                i, ev = await out.get()
                if isinstance(ev, _ClientGone):
                    self.abort(choices)
                    raise asyncio.CancelledError("client disconnected")
                if isinstance(ev, _ShuttingDown):
                    raise ApiError(503, "The server is shutting down; the request was cut.", type_="server_error",
                                   code="shutting_down")
                if isinstance(ev, BaseException):  # RequestFailed (this request) or the engine's death
                    raise ApiError(500, f"generation failed: {ev}", type_="server_error")
                ch = choices[i]
                if ch.finish_reason is not None:
                    continue  # tokens produced after a stop string, before the abort landed
                yield ch, ev
        finally:
            self._active.discard(out)
            if watcher is not None:
                watcher.cancel()

    def usage(self, choices: list[_Choice], prompt_lens: list[int]) -> dict[str, int]:
        prompt = sum(prompt_lens)
        completion = sum(len(c.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def completion_logprobs(self, ch: _Choice, k: int) -> dict[str, Any]:
        tokens, lps, tops, offsets, offset = [], [], [], [], 0
        for ev in ch.logprobs:
            t = self.token_text(ev.token_id)
            tokens.append(t)
            lps.append(ev.logprob)
            tops.append({self.token_text(i): lp for i, lp in (ev.top_logprobs or [])} if k else None)
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, events: list[TokenEvent]) -> dict[str, Any]:
        def entry(tid: int, lp: float) -> dict[str, Any]:
            t = self.token_text(tid)
            return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}

        return {"content": [dict(entry(ev.token_id, ev.logprob),
                                 top_logprobs=[entry(i, lp) for i, lp in (ev.top_logprobs or [])])
                            for ev in events]}


# ------------------------------------------------------------------------------ app


_ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def create_app(server: OnnxServer) -> FastAPI:
    """The FastAPI app; the engine thread starts and stops with the app's lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine.start()
        try:
            yield
        finally:
            server.engine.shutdown()

    # /docs and /openapi.json would be open without the key: with a key only /openapi.json, behind it
    app = FastAPI(title="flap-deploy ONNX Runtime server", lifespan=lifespan,
                  **({"docs_url": None, "redoc_url": None, "openapi_url": None} if server.api_key else {}))
    app.state.server = server

    if server.api_key:
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request):
            server.check_auth(request)
            return app.openapi()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: still OpenAI's shape
        return ApiError(500, f"internal error ({type(exc).__name__})", type_="server_error").response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), code=None).response()

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if path.startswith("/v1/"):  # unknown paths share one label: bounded cardinality
            endpoint = path if path in _ENDPOINTS else "other"
            server.metrics.of(server.metrics.requests, endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        if not server.engine.alive:
            raise ApiError(503, "the engine is not running", type_="server_error")
        return {"status": "ok", **server.engine.stats()}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=server.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_auth(request)
        card = ModelCard(id=server.model_name, created=server.created, root=server.model_root,
                         max_model_len=server.max_model_len)
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_auth(request)
        body: CompletionRequest = await server.parse(request, CompletionRequest)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        prompts = await asyncio.to_thread(server.completion_prompts, body)  # off the event loop
        jobs, choices, lens = [], [], []
        for p in prompts:
            for _ in range(body.n):
                idx = len(choices)
                jobs.append(server.sampling(body, len(p), body.max_tokens, body.logprobs, idx))
                choices.append(_Choice(index=idx, prompt_len=len(p)))
            lens.append(len(p))
        all_prompts = [p for p in prompts for _ in range(body.n)]
        return await _generate(server, request, body, all_prompts, jobs, choices, lens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        server.check_auth(request)
        body: ChatCompletionRequest = await server.parse(request, ChatCompletionRequest)
        prompt = await asyncio.to_thread(server.chat_prompt, body)
        k = (body.top_logprobs or 0) if body.logprobs else None
        jobs = [server.sampling(body, len(prompt), body.effective_max_tokens(), k, i) for i in range(body.n)]
        choices = [_Choice(index=i, prompt_len=len(prompt)) for i in range(body.n)]
        return await _generate(server, request, body, [prompt] * body.n, jobs, choices, [len(prompt)], chat=True)

    return app


async def _generate(server: OnnxServer, request: Request, body: Any, prompts: list[list[int]],
                    params: list[SamplingParams], choices: list[_Choice], prompt_lens: list[int], *, chat: bool):
    out: asyncio.Queue = asyncio.Queue()
    server.submit_all(prompts, params, choices, out)
    stop = body.stop_list()
    hold = max((len(s) for s in stop), default=1) - 1
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    want_lp = params[0].logprobs is not None

    if not body.stream:
        try:
            async for ch, ev in server.events(out, choices, request):
                server.advance(ch, ev, stop, 0)
        finally:
            server.abort(choices)
        result = []
        for ch in choices:
            n_tokens = len(ch.token_ids)
            if chat:
                c = {"index": ch.index, "message": {"role": "assistant", "content": ch.text},
                     "logprobs": server.chat_logprobs(ch.logprobs[:n_tokens]) if want_lp else None,
                     "finish_reason": ch.finish_reason}
            else:
                c = {"index": ch.index, "text": ch.text,
                     "logprobs": server.completion_logprobs(ch, params[0].logprobs) if want_lp else None,
                     "finish_reason": ch.finish_reason}
            result.append(c)
        return {"id": rid, "object": obj, "created": created, "model": server.model_name, "choices": result,
                "usage": server.usage(choices, prompt_lens)}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"

    def sse(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def stream() -> AsyncIterator[str]:
        started = set()
        try:
            async for ch, ev in server.events(out, choices, request):
                delta = server.advance(ch, ev, stop, hold)
                done = ch.finish_reason is not None
                if chat:
                    d: dict[str, Any] = {"content": delta}
                    if ch.index not in started:
                        d = {"role": "assistant", "content": delta}
                        started.add(ch.index)
                    c = {"index": ch.index, "delta": d,
                         "logprobs": server.chat_logprobs([ev]) if want_lp else None,
                         "finish_reason": ch.finish_reason}
                else:
                    lp = None
                    if want_lp:
                        one = _Choice(index=ch.index, prompt_len=0, logprobs=[ev])
                        lp = server.completion_logprobs(one, params[0].logprobs)
                    c = {"index": ch.index, "text": delta, "logprobs": lp, "finish_reason": ch.finish_reason}
                chunk = {"id": rid, "object": chunk_obj, "created": created, "model": server.model_name,
                         "choices": [c]}
                last = done and all(x.finish_reason is not None for x in choices)
                if last and not include_usage:
                    chunk["usage"] = server.usage(choices, prompt_lens)
                yield sse(chunk)
            if include_usage:
                yield sse({"id": rid, "object": chunk_obj, "created": created, "model": server.model_name,
                           "choices": [], "usage": server.usage(choices, prompt_lens)})
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            yield "data: [DONE]\n\n"
        finally:
            # a client that went away cancels this generator: free its engine slots
            server.abort(choices)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------ entry point


def load_onnx_server(model_dir: str | Path, *, served_model_name: str | None = None, max_num_seqs: int = 8,
                     max_model_len: int | None = None, max_queue: int = 256, api_key: str | None = None,
                     threads: int | None = None, max_request_bytes: int = 4 << 20, max_prefill_tokens: int = 1024,
                     shutdown_timeout_s: float = 30.0, max_memory: int | None = None,
                     log: Any = None) -> OnnxServer:
    """A server object for an ONNX export directory, or a checkpoint (exported once, see ensure_onnx).

    The memory budget (weights, full KV cache, one prefill chunk) is stated on ``log``
    (stderr by default); with ``max_memory`` (bytes) a configuration whose budget exceeds it
    is refused before the model loads.
    """
    import sys

    from exporters.onnx import OnnxCausalLM  # noqa: PLC0415  (optional dependency)
    from exporters.onnx.export import ensure_onnx
    from exporters.onnx.manifest import read_manifest
    from flap_deploy.errors import FlapDeployError, ParameterError
    from flap_deploy.streaming.memory import give_back_memory
    from serving.onnx.guards import memory_budget

    path = ensure_onnx(model_dir)
    manifest = read_manifest(path)
    limit = _model_max_len(manifest, path)
    if max_model_len is None:
        max_model_len = limit
    elif limit is not None and max_model_len > limit:
        raise ParameterError("max_model_len", f"{max_model_len} exceeds the model's {limit} positions")
    if max_model_len is None:
        raise ParameterError("max_model_len", f"is needed: {path} does not tell its context length")
    budget = memory_budget(manifest, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                           max_prefill_tokens=max_prefill_tokens)
    total = budget["weights"] + budget["kv_cache"] + budget["prefill"]
    mib = lambda b: f"{b / (1 << 20):,.0f} MiB"  # noqa: E731
    print(f"flap-deploy: memory budget {mib(total)}: weights {mib(budget['weights'])}, KV cache up to "
          f"{mib(budget['kv_cache'])} ({max_num_seqs} seqs x {max_model_len} tokens), prefill chunk "
          f"{mib(budget['prefill'])} ({max_prefill_tokens} tokens)", file=log or sys.stderr, flush=True)
    if max_memory is not None and total > max_memory:
        raise ParameterError("max_memory", f"the budget {mib(total)} exceeds {mib(max_memory)}; lower max_num_seqs, "
                                           "max_model_len or max_prefill_tokens")
    # No spinning: between graph calls ORT's idle workers would otherwise busy-wait on the cores
    # that the event loop needs for HTTP, tokenization and streaming. No arena: a long prefill's
    # peak goes back to the OS when it ends (give_back_memory returns the freed heap pages).
    model = OnnxCausalLM.from_dir(path, threads=threads, session_config={"session.intra_op.allow_spinning": "0"},
                                  memory_arena=False)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise FlapDeployError(f"{path}: no tokenizer files beside model.onnx; the server needs one")
    return OnnxServer(model, tokenizer, model_name=served_model_name or Path(model_dir).name, max_model_len=max_model_len,
                      max_num_seqs=max_num_seqs, max_queue=max_queue, api_key=api_key, model_root=str(path),
                      max_request_bytes=max_request_bytes, max_prefill_tokens=max_prefill_tokens,
                      shutdown_timeout_s=shutdown_timeout_s, after_prefill=lambda tokens: give_back_memory())


def _model_max_len(manifest: dict[str, Any], path: Path) -> int | None:
    for key in ("max_length", "max_position_embeddings", "max_model_len", "max_positions"):  # export's limit first
        if isinstance(manifest.get(key), int):
            return manifest[key]
    cfg = path / "config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("max_position_embeddings")
        if isinstance(value, int):
            return value
    return None


def run_server(server: OnnxServer, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               header_timeout_s: float = 10.0) -> int:
    """Serve with uvicorn until SIGINT/SIGTERM (graceful, see the module doc) or the engine's death.

    Returns the exit code: 0 after a requested stop, 1 when the engine died.
    """
    import uvicorn

    from serving.onnx.guards import header_timeout_protocol

    class _Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            server.begin_drain()  # before uvicorn waits for the running requests
            await super().shutdown(sockets)

    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=server.shutdown_timeout_s,
                            http=header_timeout_protocol(header_timeout_s))
    uv = _Uvicorn(config)
    server.on_engine_death = lambda error: setattr(uv, "should_exit", True)
    uv.run()
    return 1 if server.engine.error is not None else 0


def serve_onnx(model_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_num_seqs: int = 8, max_model_len: int | None = None, max_queue: int = 256,
               served_model_name: str | None = None, threads: int | None = None, log_level: str = "info",
               max_request_bytes: int = 4 << 20, max_prefill_tokens: int = 1024, shutdown_timeout_s: float = 30.0,
               header_timeout_s: float = 10.0, max_memory: int | None = None) -> int:
    """Serve an ONNX model directory until interrupted; the process exit code (see ``run_server``)."""
    server = load_onnx_server(model_dir, served_model_name=served_model_name, max_num_seqs=max_num_seqs,
                              max_model_len=max_model_len, max_queue=max_queue, api_key=api_key, threads=threads,
                              max_request_bytes=max_request_bytes, max_prefill_tokens=max_prefill_tokens,
                              shutdown_timeout_s=shutdown_timeout_s, max_memory=max_memory)
    return run_server(server, host=host, port=port, log_level=log_level, header_timeout_s=header_timeout_s)
