"""The web page: ``/`` serves index.html, ``/ui/*`` its scripts and styles.

Plain files, no build step; the page talks to the same JSON API as any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"
STATIC_DIR = WEB_DIR / "static"

router = APIRouter(tags=["web"], include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    # no-cache: the browser revalidates (ETag), so a new release shows at once.
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def install_web(app: FastAPI) -> None:
    """Serve the page at ``/`` and its files under ``/ui``."""
    app.include_router(router)
    app.mount("/ui", StaticFiles(directory=STATIC_DIR), name="ui")
