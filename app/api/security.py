"""Optional API keys: ``Authorization: Bearer <key>`` on every request.

A pure ASGI middleware rather than a route dependency: it covers every route
and mount, present and future, and refuses a request before its body is read
(a dependency runs after FastAPI has parsed the body). Read-write keys may do
anything; read-only keys may read (GET, HEAD) and call the POST routes that
change nothing (search, answer, rerank). Any other POST, PUT, PATCH or DELETE
needs a read-write key, so a route added later is write-protected by default.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from enum import Enum

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import error_body
from app.api.routes.web import DOCS_ASSETS_URL, DOCS_PATHS
from app.settings import Settings

logger = logging.getLogger("app.api")

SCHEME_NAME = "bearerAuth"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# POST routes that only read: search, answer, rerank, the reference format.
READ_ONLY_POSTS = re.compile(r"^/v1/collections/[^/]+/(?:search|answer)/?$|^/v1/rerank/?$|^/api/search/?$")
# The web page's shell and its files hold no data; the page asks for a key.
PUBLIC_PREFIXES = ("/ui/", DOCS_ASSETS_URL + "/")


class Access(Enum):
    READ = "read"
    WRITE = "write"


def public_paths(app: FastAPI, settings: Settings) -> frozenset[str]:
    """Paths answered without a key: the probes, the web page, and (unless
    ``public_docs`` is false) the OpenAPI pages, which hold no data."""
    paths = {"/health", "/ready", "/", "/ui"}
    if settings.public_docs:
        paths.update(DOCS_PATHS)
        if app.openapi_url:
            paths.add(app.openapi_url)
    return frozenset(paths)


def app_path(scope: Scope) -> str:
    """The request's path within the app: uvicorn puts ``--root-path`` in
    front of ``scope["path"]``."""
    path = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def required_access(method: str, path: str) -> Access:
    if method in READ_METHODS or (method == "POST" and READ_ONLY_POSTS.fullmatch(path)):
        return Access.READ
    return Access.WRITE


def _digest(key: str) -> bytes:
    # Equal-length digests: compare_digest then takes the same time for any
    # presented key, whatever its length.
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        read_write_keys: list[SecretStr],
        read_only_keys: list[SecretStr],
        public: frozenset[str],
    ):
        self.app = app
        self.public = public
        self._read_write = [_digest(k.get_secret_value()) for k in read_write_keys]
        self._read_only = [_digest(k.get_secret_value()) for k in read_only_keys]

    def access_of(self, token: str) -> Access | None:
        """The access a presented key grants; every key is compared, in
        constant time, with no early exit."""
        presented = _digest(token)
        write = [hmac.compare_digest(presented, key) for key in self._read_write]
        read = [hmac.compare_digest(presented, key) for key in self._read_only]
        if any(write):
            return Access.WRITE
        if any(read):
            return Access.READ
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = app_path(scope)
        if path in self.public or path.startswith(PUBLIC_PREFIXES):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        token = token.strip()
        granted = self.access_of(token) if scheme.lower() == "bearer" and token else None
        needed = Access.READ if scope["type"] == "websocket" else required_access(scope["method"], path)
        if granted is None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            # RFC 6750: no credentials gets a bare challenge, bad ones say why.
            challenge = 'Bearer error="invalid_token"' if token else "Bearer"
            message = "invalid API key" if token else "an API key is required: send 'Authorization: Bearer <key>'"
            response = JSONResponse(
                error_body("unauthorized", message), status_code=401, headers={"WWW-Authenticate": challenge}
            )
            await response(scope, receive, send)
            return
        if needed is Access.WRITE and granted is not Access.WRITE:
            response = JSONResponse(
                error_body("forbidden", "this API key is read-only; the request needs a read-write key"),
                status_code=403,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install_openapi_security(app: FastAPI, public: frozenset[str]) -> None:
    """Declare the bearer scheme in OpenAPI (the Authorize button of /docs)
    and mark the public operations as needing none."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema.setdefault("components", {}).setdefault("securitySchemes", {})[SCHEME_NAME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: read-write, or read-only for GET, search, answer and rerank.",
        }
        schema["security"] = [{SCHEME_NAME: []}]
        for path, operations in schema.get("paths", {}).items():
            if path in public or path.startswith(PUBLIC_PREFIXES):
                for operation in operations.values():
                    operation["security"] = []
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
