"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowed",
    413: "BadRequestError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """Raise anywhere in a handler to answer with this status and message."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.err_type = err_type or _TYPES.get(status, HTTPStatus(status).phrase.replace(" ", ""))


def error_body(message: str, status: int = 400, param: str | None = None, err_type: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": err_type or _TYPES.get(status, "BadRequestError"),
            "param": param,
            "code": status,
        }
    }


def json_error(message: str, status: int = 400, param: str | None = None, err_type: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(message, status, param, err_type), status_code=status)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """FastAPI's RequestValidationError details -> one readable message and the first bad field."""
    parts = []
    param = None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            parts.append(f"malformed JSON in the request body: {ctx.get('error', e.get('msg'))}")
            continue
        if param is None and loc:
            param = loc[0]
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request", param
