"""The ONNX Runtime server's state and request intake, shared by every endpoint.

``OnnxServer`` holds the engine, the tokenizer and the settings, and does what every endpoint
does before and around generation: the API key, the body (refused past `max_request_bytes`
before it is read, within `body_timeout_s`), its parsing, admission into the engine, the
engine's events until the request ends (a client that goes away frees its engine slots at the
next step), and the graceful stop (on SIGTERM it stops admitting, lets running requests finish,
and shortly before `shutdown_timeout_s` ends the rest with an error). What an endpoint makes of
a request and its tokens is in ``completions.py`` and ``chat.py``; the app in ``app.py``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Request
from pydantic import BaseModel, ValidationError

from flap_deploy.errors import FlapDeployError, ParameterError
from flap_deploy.generation.sampling import SamplingParams
from serving.onnx.engine import Engine, EngineDead, QueueFull, TokenEvent
from serving.onnx.errors import (
    ApiError,
    ClientGone,
    ShuttingDown,
    overloaded,
    validation_error,
)
from serving.onnx.prometheus import ServerMetrics
from serving.onnx.settings import OnnxServerSettings


class OnnxServer:
    """The engine, the tokenizer and the request handling behind the FastAPI app (``app.create_app``)."""

    def __init__(self, model: Any, tokenizer: Any, settings: OnnxServerSettings, *, model_root: str | None = None,
                 after_prefill: Any = None):
        if settings.max_model_len is None:
            raise ParameterError("max_model_len", "is needed: the server does not know the model's context length")
        self.settings = settings
        self.draining = False  # SIGTERM received: no new requests
        self.on_engine_death: Any = None  # set by app.run_server: stop the process
        self._active: set[asyncio.Queue] = set()  # event queues of running requests
        self.tokenizer = tokenizer
        self.model_name = settings.served_model_name or Path(settings.model).name
        self.model_root = model_root
        self.max_model_len = settings.max_model_len
        self.metrics = ServerMetrics(self.model_name)
        eos = set(getattr(model, "eos_token_ids", None) or ())  # the model's (generation) EOS ids
        if isinstance(getattr(tokenizer, "eos_token_id", None), int):
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.engine = Engine(model, max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                             max_queue=settings.max_queue, eos_token_ids=self.eos_token_ids, metrics=self.metrics,
                             max_prefill_tokens=settings.max_prefill_tokens, on_death=self._engine_died,
                             after_prefill=after_prefill)
        self.created = int(time.time())

    def _engine_died(self, error: BaseException) -> None:
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
        timeout = self.settings.shutdown_timeout_s
        asyncio.get_running_loop().call_later(max(0.0, timeout - min(1.0, timeout / 4)), self.cut_running)

    def cut_running(self) -> None:
        """End every running request now: each gets a final error (SSE event + [DONE], or a 503)."""
        for q in list(self._active):
            q.put_nowait((-1, ShuttingDown()))

    # -------------------------------------------------------------- request intake

    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "Incorrect or missing API key (send 'Authorization: Bearer KEY').",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        """The body, refused (413) past `max_request_bytes` before it is all read; within `body_timeout_s`."""
        limit = self.settings.max_request_bytes
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
            return await asyncio.wait_for(read(), self.settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.settings.body_timeout_s:g} s",
                           code="request_timeout") from None

    async def parse(self, request: Request, cls: type[BaseModel]) -> Any:
        """The authorized request's body as ``cls``; 503 while draining, 400 for what can never succeed."""
        self.check_auth(request)
        if self.draining:
            raise ApiError(503, "The server is shutting down.", type_="server_error", code="shutting_down")
        raw = await self.read_body(request)
        too_deep = ApiError(400, "the request body is nested too deeply")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        except RecursionError:
            raise too_deep from None
        if not isinstance(data, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            body = cls.model_validate(data)
        except RecursionError:
            raise too_deep from None
        except ValidationError as e:
            raise validation_error(e) from None
        if body.model is not None and body.model not in (self.model_name, self.model_root):
            raise ApiError(404, f"The model `{body.model}` does not exist.", param="model", code="model_not_found")
        return body

    # -------------------------------------------------------------- the engine

    def submit_all(self, prompts: list[list[int]], params: list[SamplingParams], sinks: list[Any]) -> list[int]:
        """Admit every sequence of a request, or none (400 when it could never be admitted, 503 when full)."""
        max_queue = self.engine.max_queue
        if len(prompts) > max_queue:  # could never be admitted: not a retry case
            raise ApiError(400, f"the request asks for {len(prompts)} sequences (n x prompts); this server queues "
                                f"at most {max_queue} (--max-queue)", param="n")
        if self.engine.stats()["waiting"] + len(prompts) > max_queue:
            self.metrics.of(self.metrics.rejected).inc()
            raise overloaded()
        ids: list[int] = []
        try:
            for ids_, sp, sink in zip(prompts, params, sinks):
                ids.append(self.engine.submit(ids_, sp, sink))
        except QueueFull:
            self.abort(ids)
            raise overloaded() from None
        except EngineDead:
            self.abort(ids)
            raise ApiError(503, "The engine is not running.", type_="server_error") from None
        return ids

    def abort(self, request_ids: list[int]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)

    async def events(self, out: asyncio.Queue, unfinished: Any, request: Request | None
                     ) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(index, event) from the engine while ``unfinished()``; raise on engine failure, shutdown or a gone client.

        A watcher task answers the client's disconnect at once (not at the next token), so an
        abandoned request frees its slots within one engine step, streaming or not.
        """
        watcher = asyncio.create_task(_watch_disconnect(request, out)) if request is not None else None
        self._active.add(out)
        try:
            while unfinished():
                i, ev = await out.get()
                if isinstance(ev, ClientGone):
                    raise asyncio.CancelledError("client disconnected")
                if isinstance(ev, ShuttingDown):
                    raise ApiError(503, "The server is shutting down; the request was cut.", type_="server_error",
                                   code="shutting_down")
                if isinstance(ev, BaseException):  # RequestFailed (this request) or the engine's death
                    raise ApiError(500, f"generation failed: {ev}", type_="server_error")
                yield i, ev
        finally:
            self._active.discard(out)
            if watcher is not None:
                watcher.cancel()

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


async def _watch_disconnect(request: Request, out: asyncio.Queue) -> None:
    """Put a ClientGone into `out` when the client disconnects (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            out.put_nowait((-1, ClientGone()))
            return


# ------------------------------------------------------------------------------ from settings


def load_onnx_server(settings: OnnxServerSettings, log: Any = None) -> OnnxServer:
    """A server for ``settings.model``: an ONNX export directory, or a checkpoint (exported once, see ensure_onnx).

    The memory budget (weights, full KV cache, one prefill chunk) is stated on ``log``
    (stderr by default); with ``max_memory`` a configuration whose budget exceeds it is
    refused before the model loads.
    """
    from exporters.onnx import OnnxCausalLM  # noqa: PLC0415  (optional dependency)
    from exporters.onnx.export import ensure_onnx
    from exporters.onnx.manifest import read_manifest
    from flap_deploy.streaming.memory import give_back_memory

    path = ensure_onnx(settings.model)
    manifest = read_manifest(path)
    settings = settings.replace(max_model_len=_context_length(settings, manifest, path))
    _check_memory_budget(settings, manifest, log or sys.stderr)
    # No spinning: between graph calls ORT's idle workers would otherwise busy-wait on the cores
    # that the event loop needs for HTTP, tokenization and streaming. No arena: a long prefill's
    # peak goes back to the OS when it ends (give_back_memory returns the freed heap pages).
    model = OnnxCausalLM.from_dir(path, threads=settings.threads,
                                  session_config={"session.intra_op.allow_spinning": "0"}, memory_arena=False)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise FlapDeployError(f"{path}: no tokenizer files beside model.onnx; the server needs one")
    return OnnxServer(model, tokenizer, settings, model_root=str(path), after_prefill=lambda tokens: give_back_memory())


def _context_length(settings: OnnxServerSettings, manifest: dict[str, Any], path: Path) -> int:
    """``max_model_len``, or the model's positions when unset; never more than the model's positions."""
    limit = _model_max_len(manifest, path)
    if settings.max_model_len is None:
        if limit is None:
            raise ParameterError("max_model_len", f"is needed: {path} does not tell its context length")
        return limit
    if limit is not None and settings.max_model_len > limit:
        raise ParameterError("max_model_len", f"{settings.max_model_len} exceeds the model's {limit} positions")
    return settings.max_model_len


def _check_memory_budget(settings: OnnxServerSettings, manifest: dict[str, Any], log: Any) -> None:
    from serving.onnx.guards import memory_budget

    budget = memory_budget(manifest, max_num_seqs=settings.max_num_seqs, max_model_len=settings.max_model_len,
                           max_prefill_tokens=settings.max_prefill_tokens)
    total = budget["weights"] + budget["kv_cache"] + budget["prefill"]
    mib = lambda b: f"{b / (1 << 20):,.0f} MiB"  # noqa: E731
    print(f"flap-deploy: memory budget {mib(total)}: weights {mib(budget['weights'])}, KV cache up to "
          f"{mib(budget['kv_cache'])} ({settings.max_num_seqs} seqs x {settings.max_model_len} tokens), prefill "
          f"chunk {mib(budget['prefill'])} ({settings.max_prefill_tokens} tokens)", file=log, flush=True)
    if settings.max_memory is not None and total > settings.max_memory:
        raise ParameterError("max_memory", f"the budget {mib(total)} exceeds {mib(settings.max_memory)}; lower "
                                           "max_num_seqs, max_model_len or max_prefill_tokens")


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
