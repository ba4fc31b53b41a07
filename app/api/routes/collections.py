from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import ServiceDep
from app.api.links import CREATED_COLLECTION
from app.api.schemas import ERROR_RESPONSES, CollectionCreate, CollectionList, CollectionName, CollectionOut

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
