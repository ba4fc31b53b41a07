"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from app import __version__
from app.api.errors import STORAGE_FULL_REPORT_S, error_body
from app.api.schemas import ERROR_RESPONSES, ErrorResponse

router = APIRouter(tags=["operations"], responses=ERROR_RESPONSES)


@router.get("/health")
async def health() -> dict:
    """Liveness: the process is up."""
    return {"status": "ok", "version": __version__}


def readiness(request: Request) -> tuple[bool, str, dict]:
    """(ready, why not, details): models loaded, start-up not failed, and
    this process's index writer thread running. The writer lease may be held
    by this process (it commits index changes) or another (this one only
    searches); either is ready."""
    state = request.app.state
    service = getattr(state, "service", None)
    startup = getattr(state, "startup", None)
    writer = service.writer_state() if service is not None else None
    details: dict = {
        "models_loaded": bool(service and service.ready),
        "writer": dataclasses.asdict(writer) if writer is not None else None,
    }
    answers = getattr(state, "answers", None)
    if answers is not None:
        # Reported, not required: search serves while the answer LM loads or
        # when it cannot load (the answer endpoint then says 503 itself).
        details["answers"] = answers.state()
    if startup is not None and startup.done() and not startup.cancelled() and startup.exception() is not None:
        return False, f"start-up failed ({type(startup.exception()).__name__}); see the server log", details
    waiting_for = getattr(service, "waiting_for", None)
    if waiting_for:
        return False, f"waiting for the index backend ({waiting_for})", details
    if not details["models_loaded"]:
        return False, "models are still loading", details
    # (The stateless tier has no writer; nor does a process of the api role.)
    if getattr(service, "has_writer", True) and (writer is None or not writer.alive):
        return False, "the index writer thread is not running", details
    return True, "", details


@router.get(
    "/ready",
    responses={
        503: {"model": ErrorResponse, "description": "models still loading, start-up failed, or writer stopped"}
    },
)
async def ready(request: Request):
    """Readiness: models loaded and the index writer thread running; reports
    whether this process holds the writer lease and the writer's last error."""
    ok, reason, details = readiness(request)
    if not ok:
        return JSONResponse(error_body("not_ready", reason, details), status_code=503)
    # Searches still serve while a cause outside the documents (disk full, a
    # locked database) keeps new writes pending: ready, but degraded.
    # So does a stalled writer (hung, or its process stopped): searches serve,
    # writes wait.
    writer = details["writer"] or {}
    degraded = bool(writer.get("degraded") or writer.get("stalled_s"))
    # So does a write this process refused for a full disk, for a while.
    full_at = getattr(request.app.state, "storage_full_at", None)
    if full_at is not None and time.monotonic() - full_at < STORAGE_FULL_REPORT_S:
        details["storage_full_s_ago"] = round(time.monotonic() - full_at, 1)
        degraded = True
    return {"status": "degraded" if degraded else "ready", "version": __version__, **details}


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text format). Needs a read key when keys are set."""
    body = await asyncio.to_thread(request.app.state.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
