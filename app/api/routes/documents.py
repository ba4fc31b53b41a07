from __future__ import annotations

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse

from app.api.deps import ServiceDep
from app.api.links import UPSERTED_DOCUMENTS
from app.api.schemas import (
    ERROR_RESPONSES,
    CollectionName,
    DocumentId,
    DocumentOut,
    DocumentPage,
    UpsertRequest,
    UpsertResponse,
)
from app.service import DocumentInput

# SQLite's OFFSET is a signed 64-bit integer; no collection comes near this.
MAX_OFFSET = 2**53

router = APIRouter(prefix="/v1/collections/{collection}/documents", tags=["documents"], responses=ERROR_RESPONSES)


@router.post(
    "",
    response_model=UpsertResponse,
    responses={
        200: {"description": "indexed", "links": UPSERTED_DOCUMENTS},
        202: {"model": UpsertResponse, "description": "stored, not indexed yet", "links": UPSERTED_DOCUMENTS},
    },
)
async def upsert_documents(collection: CollectionName, body: UpsertRequest, service: ServiceDep):
    """Insert or replace documents. With ``wait`` (default) the answer comes
    after the index commit, so a search right after it sees the documents."""
    docs = [DocumentInput(d.id, d.text, d.title, d.metadata, fields=d.fields) for d in body.documents]
    results = await service.upsert_documents(collection, docs, wait=body.wait)
    payload = UpsertResponse(collection=collection, results=results).model_dump()
    pending = any(r["status"] == "pending" for r in results)
    return JSONResponse(payload, status_code=202 if pending else 200)


@router.get("", response_model=DocumentPage)
async def list_documents(
    collection: CollectionName,
    service: ServiceDep,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=MAX_OFFSET),
):
    docs, total = await service.list_documents(collection, limit, offset)
    return {
        "documents": [{**d, "id": d["external_id"]} for d in docs],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


@router.get("/{document_id:path}", response_model=DocumentOut)
async def get_document(collection: CollectionName, document_id: DocumentId, service: ServiceDep):
    doc = await service.get_document(collection, document_id)
    doc["id"] = doc.pop("external_id")
    doc["chunks"] = [
        {
            "chunk_id": c["id"],
            "chunk_index": c["ord"],
            "text": c["text"],
            "char_start": c["char_start"],
            "char_end": c["char_end"],
            "page": c["page"],
            "heading": c["heading"],
            "field": c["field"],
        }
        for c in doc["chunks"]
    ]
    return doc


@router.delete("/{document_id:path}", status_code=204)
async def delete_document(collection: CollectionName, document_id: DocumentId, service: ServiceDep):
    await service.delete_document(collection, document_id)
    return Response(status_code=204)
