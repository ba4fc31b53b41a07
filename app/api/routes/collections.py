from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import ServiceDep
from app.api.links import CREATED_COLLECTION
from app.api.schemas import (
    ERROR_RESPONSES,
    CollectionCreate,
    CollectionList,
    CollectionName,
    CollectionOut,
    ReindexRequest,
)

router = APIRouter(prefix="/v1/collections", tags=["collections"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=CollectionOut, responses={201: {"links": CREATED_COLLECTION}})
async def create_collection(body: CollectionCreate, service: ServiceDep):
    row = await service.create_collection(body.name, body.description)
    return await service.describe_collection(row)


@router.get("", response_model=CollectionList)
async def list_collections(service: ServiceDep):
    return {"collections": await service.list_collections()}


@router.get("/{collection}", response_model=CollectionOut)
async def get_collection(collection: CollectionName, service: ServiceDep):
    return await service.describe_collection(await service.get_collection(collection))


@router.delete("/{collection}", status_code=204)
async def delete_collection(collection: CollectionName, service: ServiceDep):
    await service.delete_collection(collection)
    return Response(status_code=204)


@router.post(
    "/{collection}/reindex",
    status_code=202,
    response_model=CollectionOut,
    summary="Re-index the collection with another checkpoint",
    description="Builds a new index of every passage, encoded with the checkpoint given (e.g. one tuning wrote), "
    "beside the served one: searches and writes go on meanwhile, and the new index and its checkpoint are served "
    "from one commit once it holds every passage. Its progress is the collection's `reindex`; a re-index already "
    "running starts over.",
)
async def start_reindex(collection: CollectionName, body: ReindexRequest, service: ServiceDep):
    return await service.describe_collection(await service.start_reindex(collection, body.checkpoint))


@router.delete(
    "/{collection}/reindex",
    response_model=CollectionOut,
    summary="Stop a running re-index",
    description="The served index and its checkpoint stay as they are; what the re-index built is dropped.",
)
async def cancel_reindex(collection: CollectionName, service: ServiceDep):
    return await service.describe_collection(await service.cancel_reindex(collection))
