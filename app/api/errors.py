"""One JSON error shape for every 4xx/5xx: {"error": {"code", "message"}}."""

from __future__ import annotations

import logging
import sqlite3
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from app.errors import ServerError, error_chain

logger = logging.getLogger("app.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def _is_lock_timeout(exc: sqlite3.OperationalError) -> bool:
    return "database is locked" in str(exc) or "database is busy" in str(exc)


def _is_storage_full(exc: BaseException) -> bool:
    """The disk is full, here or in what this error interrupted (a failed
    ROLLBACK after SQLite rolled back a full transaction itself)."""
    return any("disk is full" in str(e).lower() or "no space left" in str(e).lower() for e in error_chain(exc))


# How long after a write refused for a full disk /ready says "degraded".
STORAGE_FULL_REPORT_S = 60.0


def error_body(code: str, message: str, details=None) -> dict:
    error = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path. Starlette's 405 names only
    the first route whose path matched, and each method is a route of its own
    here (GET and DELETE of a collection), so its Allow header left some out.
    Each method is tried against the routes as the router itself would."""
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError):
        return JSONResponse(error_body(exc.code, exc.message, exc.details), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(error_body("malformed_json", "request body is not valid JSON"), status_code=400)
        details = [
            {"loc": list(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")} for e in errors
        ]
        first = details[0] if details else {"loc": [], "message": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(
            error_body("validation_error", f"{where}: {first['message']}" if where else first["message"], details),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers["Allow"] = ", ".join(allowed)
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(sqlite3.OperationalError)
    async def _store_busy(request: Request, exc: sqlite3.OperationalError):
        if _is_storage_full(exc):
            # SQLite rolled the transaction back: nothing was stored. The
            # machine's fault, not the request's: 507, and /ready degraded.
            request.app.state.storage_full_at = time.monotonic()
            logger.error("%s %s: the disk is full: %s", request.method, request.url.path, exc)
            return JSONResponse(
                error_body("storage_full", "the server's disk is full; nothing was changed, retry later"),
                status_code=507,
                headers={"Retry-After": "30"},
            )
        if not _is_lock_timeout(exc):
            return await _unexpected(request, exc)
        # The write lock stayed with other writers past the busy timeout: the
        # transaction never began, nothing was stored; the client may retry.
        logger.warning("%s %s: the store stayed locked by other writes", request.method, request.url.path)
        return JSONResponse(
            error_body("store_busy", "the store is busy with other writes; nothing was changed, retry"),
            status_code=503,
            headers={"Retry-After": "1"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
