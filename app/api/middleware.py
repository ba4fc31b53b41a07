"""Pure ASGI middleware around every route: request context (request id,
access log, metrics) and the request body limit; ``install_middleware``
stacks them with CORS and the API keys (app/api/security.py).

Pure ASGI rather than ``BaseHTTPMiddleware`` so streamed bodies (uploads,
the answer's event stream) pass through without being buffered.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_body
from app.api.security import READ_ONLY_POSTS, ApiKeyMiddleware, app_path, install_openapi_security, public_paths
from app.observability import Metrics, request_id_var
from app.settings import Settings

logger = logging.getLogger("app.api")
access_logger = logging.getLogger("app.access")

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept when it is short and plain (it goes into logs).
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_template(scope: Scope) -> str:
    """The route's path template (``/v1/collections/{collection}/search``),
    never the raw path: a bounded set of metric labels. Requests answered
    before routing (401, 413) are matched here."""
    route = scope.get("route")
    if route is None:
        route = _match(getattr(getattr(scope.get("app"), "router", None), "routes", ()), scope)
    return getattr(route, "path", None) or "unmatched"


def _match(routes, scope: Scope):
    for route in routes:
        # FastAPI keeps an included router as one entry holding the original
        # router, whose routes carry their full paths (the routers declare
        # their prefixes; the factory includes them without one).
        included = getattr(route, "original_router", None)
        found = _match(included.routes, scope) if included is not None else None
        if found is None and included is None and route.matches(scope)[0] is not Match.NONE:
            found = route
        if found is not None:
            return found
    return None


class RequestContextMiddleware:
    """Gives each request an id (the client's ``X-Request-ID`` when sane),
    returns it in the response, and records the access log line and the
    request metrics. Unexpected errors are logged here, with the id, and
    answered with the JSON 500 shape."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None = None, access_log: bool = True):
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = given if SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if response_started:
                raise
            response = JSONResponse(error_body("internal_error", "internal server error"), status_code=500)
            await response(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = route_template(scope)
            if self.metrics is not None:
                labels = (method, route, str(status))
                self.metrics.requests.labels(*labels).inc()
                self.metrics.request_seconds.labels(*labels).observe(elapsed)
            if self.access_log:
                access_logger.info(
                    "%s %s %d %.1fms",
                    method,
                    route,
                    status,
                    elapsed * 1000,
                    extra={
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )
            request_id_var.reset(token)


class _BodyTooLarge(Exception):
    pass


_UPLOAD_PATH = re.compile(r"/v1/collections/[^/]+/files/?$")


class BodyLimitMiddleware:
    """413 in the JSON error shape for a body over the limit: at once when
    Content-Length says so, else as soon as a chunked body grows past it
    (whatever the route was doing with the partial body is discarded).
    Multipart uploads to the files route have their own, larger limit; the
    routes that only read (search, answer, rerank) a small one."""

    def __init__(self, app: ASGIApp, max_request_bytes: int, max_upload_bytes: int, max_query_bytes: int):
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_upload_bytes = max_upload_bytes
        self.max_query_bytes = max_query_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        # The upload limit is for the upload route only: a client cannot buy
        # the larger limit for another route by declaring a multipart body.
        path = app_path(scope)
        upload = headers.get("content-type", "").lower().startswith("multipart/") and bool(_UPLOAD_PATH.search(path))
        if upload:
            limit, what = self.max_upload_bytes, "upload"
        elif scope["method"] == "POST" and READ_ONLY_POSTS.fullmatch(path):
            limit, what = self.max_query_bytes, "request body"
        else:
            limit, what = self.max_request_bytes, "request body"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await self._reject(scope, receive, send, what, limit)
            return

        received = 0
        exceeded = False
        rejected = False
        app_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise _BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal rejected, app_started
            if exceeded:
                # The route turned the failed read into its own error
                # response (FastAPI answers 400); answer 413 instead.
                if not rejected and message["type"] == "http.response.start":
                    rejected = True
                    await self._reject(scope, receive, send, what, limit)
                return
            app_started = app_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if app_started:
                raise
            if not rejected:
                rejected = True
                await self._reject(scope, receive, send, what, limit)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send, what: str, limit: int) -> None:
        response = JSONResponse(
            error_body("payload_too_large", f"the {what} is larger than the {limit:,}-byte limit"),
            status_code=413,
            headers={"Connection": "close"},  # the rest of the body is never read
        )
        await response(scope, receive, send)


UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class ForeignOriginMiddleware:
    """403 for a state-changing request that a browser sent from another
    site: its ``Origin`` is neither this server's own nor one of
    ``CORS_ORIGINS``. A cross-site form or multipart POST is a CORS "simple
    request" that the browser sends without asking first, so without this
    any web page its user visits could upload files or change collections
    (with no keys set, or with a key the browser holds). Clients that are not
    browsers send no ``Origin`` and are not affected."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str]):
        self.app = app
        self.any_origin = "*" in allowed_origins
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS and not self.any_origin:
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            # Behind a proxy the Host may be the upstream's: the host the
            # browser used is then in X-Forwarded-Host (a header a cross-site
            # page cannot set without a preflight).
            hosts = {headers.get("host", "").lower(), headers.get("x-forwarded-host", "").split(",")[0].strip().lower()}
            if origin is not None and not self._allowed(origin.strip().lower(), hosts - {""}):
                response = JSONResponse(
                    error_body("forbidden_origin", f"requests that change data are not accepted from {origin[:200]!r}"),
                    status_code=403,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _allowed(self, origin: str, hosts: set[str]) -> bool:
        if origin in self.allowed:
            return True
        # The page this server serves itself: same host and port, whatever
        # scheme a proxy in front terminates.
        scheme, _, netloc = origin.partition("://")
        return scheme in ("http", "https") and bool(netloc) and netloc in hosts


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` gives ``::1``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host  # a bare name, or an IPv6 address without brackets


class TrustedHostMiddleware:
    """400 in the JSON error shape for a Host header this server was not told
    to answer to. A web page can point its own domain at this machine's
    address (DNS rebinding) and then call the API as same-origin; its requests
    carry that domain in Host, which this refuses. The same check as
    Starlette's middleware of this name, with IPv6 hosts parsed and the
    project's error shape."""

    # Probes and metric scrapes come by address (a container platform's
    # kubelet, a load balancer's health check, Prometheus) and hold no
    # documents: answered for any host (/metrics still needs a key when keys are set).
    PROBES = frozenset({"/health", "/ready", "/metrics"})

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]):
        self.app = app
        hosts = [h.strip().lower() for h in allowed_hosts]
        self.any_host = "*" in hosts
        self.exact = {h.strip("[]") for h in hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))

    def allowed(self, host_header: str) -> bool:
        name = host_name(host_header)
        return name in self.exact or (bool(self.suffixes) and name.endswith(self.suffixes))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not self.any_host and app_path(scope) not in self.PROBES:
            host = Headers(scope=scope).get("host", "")
            if not self.allowed(host):
                response = JSONResponse(
                    error_body(
                        "invalid_host",
                        f"this server does not answer to the host {host[:200]!r}; "
                        "COLBERT_SERVER_ALLOWED_HOSTS names the hosts it answers to",
                    ),
                    status_code=400,
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# Routes whose requests hold a thread or a model while they run, by kind:
# each kind has its own bound on requests in progress (settings
# max_concurrent_*). Routes not listed (reads of SQLite, probes) are cheap.
_KINDS = (
    ("search", {"POST"}, re.compile(r"/v1/collections/[^/]+/search/?|/v1/rerank/?")),
    ("search", {"GET"}, re.compile(r"/api/search/?")),
    ("answer", {"POST"}, re.compile(r"/v1/collections/[^/]+/answer/?")),
    ("write", {"POST", "PUT", "DELETE"}, re.compile(r"/v1/collections/[^/]+/(?:documents|files)(?:/.*)?")),
)


class ConcurrencyLimitMiddleware:
    """503 ``overloaded`` with ``Retry-After`` once a kind of expensive route
    has its bound of requests in progress, instead of queueing without
    limit (a queue the client would wait out anyway, holding memory, then
    time out). A streamed answer counts until its stream ends."""

    def __init__(self, app: ASGIApp, searches: int, answers: int, writes: int, metrics: Metrics | None = None):
        self.app = app
        self.limits = {"search": searches, "answer": answers, "write": writes}
        self.in_progress = dict.fromkeys(self.limits, 0)
        self.metrics = metrics

    @staticmethod
    def kind(method: str, path: str) -> str | None:
        return next((kind for kind, methods, route in _KINDS if method in methods and route.fullmatch(path)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self.kind(scope["method"], app_path(scope)) if scope["type"] == "http" else None
        if kind is None:
            await self.app(scope, receive, send)
            return
        if self.in_progress[kind] >= self.limits[kind]:
            if self.metrics is not None:
                self.metrics.overloaded.labels(kind).inc()
            response = JSONResponse(
                error_body("overloaded", f"the server has {self.limits[kind]} {kind} requests in progress; try again"),
                status_code=503,
                headers={"Retry-After": "1"},
            )
            await response(scope, receive, send)
            return
        self.in_progress[kind] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress[kind] -= 1


# The web page's scripts and styles are its own files: nothing inline, nothing
# from elsewhere. A script injected into the page (the page shows stored
# text) could read the API key it keeps; this policy keeps such a script from
# running and from sending anything to another site.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class SecurityHeadersMiddleware:
    """Headers every response gets (no MIME sniffing, no referrer sent on)
    and the page's Content-Security-Policy on HTML responses that set none
    themselves (the API docs pages set their own)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                if headers.get("content-type", "").startswith("text/html"):
                    headers.setdefault("Content-Security-Policy", PAGE_CSP)
                    headers.setdefault("X-Frame-Options", "DENY")
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _loopback(host: str) -> bool:
    """Whether the address requests arrive on is this machine's alone."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a Unix socket's path (or a name): not an open network address


class OpenBindWarningMiddleware:
    """A loud warning, once per process, when requests arrive on an address
    other than loopback while no API key is set: then anyone who can reach
    that address can change and delete every collection."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self.warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.warned and scope["type"] == "http":
            server = scope.get("server")
            if server and not _loopback(str(server[0])):
                self.warned = True
                logger.warning(
                    "serving on %s without API keys: anyone who reaches this address can read, change and "
                    "delete every collection; set COLBERT_SERVER_API_KEYS",
                    server[0],
                )
        await self.app(scope, receive, send)


def install_middleware(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    """Outermost first: request context, security headers, trusted hosts,
    CORS, API keys, foreign origins, concurrency bounds, body limit. CORS
    sits outside the keys so preflights (which carry no key) get their answer
    and refusals still carry CORS headers the browser needs to read them; the
    keys sit outside the body limit so an unauthenticated upload is refused
    before any of it is read, and outside the concurrency bounds so refused
    requests take no place."""
    # add_middleware puts each new one outermost: add innermost first.
    app.add_middleware(
        BodyLimitMiddleware,
        max_request_bytes=settings.max_request_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        max_query_bytes=settings.max_query_bytes,
    )
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        searches=settings.max_concurrent_searches,
        answers=settings.max_concurrent_answers,
        writes=settings.max_concurrent_writes,
        metrics=metrics,
    )
    app.add_middleware(ForeignOriginMiddleware, allowed_origins=settings.cors_origins)
    if settings.api_keys or settings.read_only_api_keys:
        public = public_paths(app, settings)
        app.add_middleware(
            ApiKeyMiddleware,
            read_write_keys=settings.api_keys,
            read_only_keys=settings.read_only_api_keys,
            public=public,
        )
        install_openapi_security(app, public)
    else:
        app.add_middleware(OpenBindWarningMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],
            max_age=600,
        )
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, access_log=settings.access_log)
