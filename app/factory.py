"""The application factory."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.answer.service import AnswerService
from app.api.errors import install_error_handlers
from app.api.middleware import install_middleware
from app.api.routes import answer, collections, documents, files, health, search, tuning
from app.api.routes.web import install_web
from app.observability import Metrics, configure_logging
from app.service import SearchService
from app.settings import Settings

logger = logging.getLogger("app")


def _log_startup_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("start-up failed; /ready stays 503", exc_info=task.exception())


def service_for(settings: Settings, metrics=None) -> SearchService:
    """The single-node service, or the stateless tier's (``stateless``)."""
    if settings.stateless:
        from app.stateless import StatelessService

        return StatelessService(settings, metrics)
    return SearchService(settings, metrics)


def create_app(settings: Settings | None = None, service: SearchService | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc = service or service_for(settings, app.state.metrics.engine)
        app.state.service = svc
        app.state.answers = AnswerService(settings, svc)
        # Load models in the background: /health answers at once, /ready
        # says 503 until the models are loaded.
        app.state.startup = asyncio.create_task(svc.astart())
        app.state.startup.add_done_callback(_log_startup_failure)
        await app.state.answers.astart()
        try:
            yield
        finally:
            if not app.state.startup.done():
                app.state.startup.cancel()
            await asyncio.gather(app.state.startup, return_exceptions=True)
            await app.state.answers.astop()
            await svc.astop()

    app = FastAPI(
        title="ColBERT search server",
        version=__version__,
        description="Late-interaction (ColBERT/PLAID) search over your documents.",
        lifespan=lifespan,
        # Served by install_web from local assets (app/api/routes/web.py).
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(app)
    install_error_handlers(app)
    for module in (health, collections, documents, files, search, answer, tuning):
        app.include_router(module.router)
    install_web(app)
    install_middleware(app, settings, app.state.metrics)
    return app
