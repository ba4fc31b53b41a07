"""Tuning a collection's encoder, and the checkpoints collections may be
re-indexed with (app/tuning_jobs.py, app/engine/reindex.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from app.api.deps import ServiceDep
from app.api.schemas import ERROR_RESPONSES, CheckpointList, CollectionName, TuneRequest, TuningJobOut

router = APIRouter(tags=["tuning"], responses=ERROR_RESPONSES)

TuningJobId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{32}$")]


@router.post(
    "/v1/collections/{collection}/tune",
    status_code=202,
    response_model=TuningJobOut,
    summary="Tune the encoder to the collection (no labels needed)",
    description="Starts a tuning job: pseudo-queries drawn from the collection's own passages, a contrastive "
    "MaxSim loss, and a new checkpoint under the data directory's checkpoints/, trained from the checkpoint the "
    "collection is indexed with. It runs as a process of its own at a lower CPU priority; with `reindex` the "
    "collection is then re-indexed with the result (see `POST .../reindex`).",
)
async def start_tuning(collection: CollectionName, body: TuneRequest, service: ServiceDep):
    options = body.model_dump(exclude={"reindex"})
    return await service.start_tuning(collection, options, body.reindex)


@router.get("/v1/collections/{collection}/tune/{job_id}", response_model=TuningJobOut)
async def get_tuning_job(collection: CollectionName, job_id: TuningJobId, service: ServiceDep):
    return await service.tuning_job(collection, job_id)


@router.get(
    "/v1/checkpoints",
    response_model=CheckpointList,
    summary="Checkpoints collections may be re-indexed with",
    description="The directories under the data directory's checkpoints/, with how each was tuned.",
)
async def list_checkpoints(service: ServiceDep):
    return {"checkpoints": service.list_checkpoints()}
