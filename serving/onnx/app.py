"""The ONNX Runtime server's HTTP app and process: routes, errors, auth, health, models, metrics, uvicorn.

Endpoints (ARCHITECTURE.md "HTTP contract"): GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (SSE streaming or not), GET /health, GET /metrics (Prometheus).
Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}`, 500s included;
400 for requests that can never succeed, 503 (with Retry-After) only for transient overload.

Survival rules (docs/serving.md "Reliability"): bodies above `max_request_bytes` are refused
(413) before they are read; a body must arrive within `body_timeout_s` and headers within
`header_timeout_s`; tokenization runs off the event loop; a client that goes away frees its
engine slots at the next step (streaming or not); a request that fails inside the engine ends
alone; if the engine thread dies, /health answers 503 and the process exits non-zero. On
SIGTERM the server stops admitting (503), lets running requests finish, and shortly before
`shutdown_timeout_s` ends the rest with a final error event and `[DONE]`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.onnx.chat import Chat
from serving.onnx.completions import Completions
from serving.onnx.errors import ApiError
from serving.onnx.generation import Endpoint, handle
from serving.onnx.schemas import ModelCard, ModelList
from serving.onnx.server import OnnxServer, load_onnx_server
from serving.onnx.settings import OnnxServerSettings

ENDPOINTS: tuple[Endpoint, ...] = (Completions(), Chat())
_COUNTED = ("/v1/models", *(e.path for e in ENDPOINTS))  # /v1 paths with a metrics label of their own


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
    keyed = server.settings.api_key is not None
    app = FastAPI(title="flap-deploy ONNX Runtime server", lifespan=lifespan,
                  **({"docs_url": None, "redoc_url": None, "openapi_url": None} if keyed else {}))
    app.state.server = server
    if keyed:
        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request):
            server.check_auth(request)
            return app.openapi()

    _errors_in_openai_shape(app)
    _count_requests(app, server)
    _service_routes(app, server)
    for endpoint in ENDPOINTS:
        _generation_route(app, server, endpoint)
    return app


def _errors_in_openai_shape(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: still OpenAI's shape
        return ApiError(500, f"internal error ({type(exc).__name__})", type_="server_error").response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), code=None).response()


def _count_requests(app: FastAPI, server: OnnxServer) -> None:
    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        path = request.url.path
        if path.startswith("/v1/"):  # unknown paths share one label: bounded cardinality
            endpoint = path if path in _COUNTED else "other"
            server.metrics.of(server.metrics.requests, endpoint=endpoint, status=str(response.status_code)).inc()
        return response


def _service_routes(app: FastAPI, server: OnnxServer) -> None:
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


def _generation_route(app: FastAPI, server: OnnxServer, endpoint: Endpoint) -> None:
    async def route(request: Request):
        return await handle(server, request, endpoint)

    app.add_api_route(endpoint.path, route, methods=["POST"], name=type(endpoint).__name__.lower())


# ------------------------------------------------------------------------------ the process


def run_server(server: OnnxServer) -> int:
    """Serve with uvicorn on the settings' host and port until SIGINT/SIGTERM (graceful, see the module
    doc) or the engine's death. Returns the exit code: 0 after a requested stop, 1 when the engine died."""
    import uvicorn

    from serving.onnx.guards import header_timeout_protocol

    class _Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            server.begin_drain()  # before uvicorn waits for the running requests
            await super().shutdown(sockets)

    s = server.settings
    config = uvicorn.Config(create_app(server), host=s.host, port=s.port, log_level=s.log_level,
                            timeout_graceful_shutdown=s.shutdown_timeout_s, http=header_timeout_protocol(s.header_timeout_s))
    uv = _Uvicorn(config)
    server.on_engine_death = lambda error: setattr(uv, "should_exit", True)
    uv.run()
    return 1 if server.engine.error is not None else 0


def serve_onnx(settings: OnnxServerSettings) -> int:
    """Serve ``settings.model`` until interrupted; the process exit code (see ``run_server``).
    The port is checked free before the model loads."""
    from serving.process import check_port_free

    check_port_free(settings.host, settings.port)
    return run_server(load_onnx_server(settings))
