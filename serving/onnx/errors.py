"""OpenAI's error body for every failure of the ONNX Runtime server, and the events that end a request early."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError


class ApiError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, dict[str, str | None]]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(status_code=self.status, headers=headers, content=self.body())


def overloaded() -> ApiError:
    return ApiError(503, "The server is overloaded (waiting queue full); retry later.", type_="server_error",
                    code="overloaded")


def validation_error(e: ValidationError) -> ApiError:
    """A 400 naming the first invalid field; ``param`` is its top-level field."""
    err = e.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    where = ".".join(loc)
    message = f"{where}: {err.get('msg')}" if where else str(err.get("msg"))
    return ApiError(400, message, param=loc[0] if loc else None)


class ClientGone(Exception):
    """The client closed the connection (sent through a request's event queue)."""


class ShuttingDown(Exception):
    """The server's graceful-stop deadline is near (sent through a request's event queue)."""
