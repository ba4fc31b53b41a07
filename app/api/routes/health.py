from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app import __version__
from app.api.deps import ServiceDep
from app.api.errors import error_body

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict:
    """Liveness: the process is up."""
    return {"status": "ok", "version": __version__}


@router.get("/ready", responses={503: {"description": "models still loading"}})
async def ready(service: ServiceDep):
    """Readiness: models loaded and the index writer thread running."""
    writer = service.writer_state()
    if not service.ready or not writer["alive"]:
        return JSONResponse(error_body("not_ready", "models are still loading"), status_code=503)
    return {"status": "ready", "writer": writer}
