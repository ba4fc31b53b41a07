"""The server the scale benchmark starts: the real app, with the benchmark's
stand-in encoder when asked for.

    COLBERT_BENCH_ENCODER=standin uvicorn --factory bench.scale_server:app --workers 2

``COLBERT_BENCH_ENCODER``: ``standin`` builds the app around
:class:`bench.standin.StandInEncoder` (no transformer: the engine's own cost);
unset or ``real``, the configured checkpoint as ``main:app`` loads it.
``COLBERT_BENCH_STANDIN_STATS``: a directory where each worker's stand-in
writes its document-encoding totals (see :func:`bench.standin.read_stats`).
Server settings come from ``COLBERT_SERVER_*`` variables as usual.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

from app.factory import create_app
from app.settings import Settings

ENCODER_VAR = "COLBERT_BENCH_ENCODER"
STATS_VAR = "COLBERT_BENCH_STANDIN_STATS"


def app() -> FastAPI:
    settings = Settings()
    choice = os.environ.get(ENCODER_VAR, "real").strip().lower()
    if choice == "standin":
        from app.service import SearchService
        from bench.standin import StandInEncoder

        encoder = StandInEncoder(stats_dir=os.environ.get(STATS_VAR) or None)
        return create_app(settings, SearchService(settings, encoder=encoder))
    if choice in ("", "real"):
        return create_app(settings)
    raise SystemExit(f"{ENCODER_VAR} must be 'standin' or 'real', not {choice!r}")
