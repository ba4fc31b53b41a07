"""OpenAPI links: which field of a response names what another operation
takes, so generated clients and fuzzers (schemathesis's stateful phase) go
create collection → upsert → search / get / delete with names and ids that
exist instead of random ones.

Operation ids are the ones FastAPI derives from each route's function name,
path and method; tests/api/test_api.py checks that every link names an
operation of the document and a field its response has.
"""

from __future__ import annotations

from typing import Any


def _link(operation_id: str, description: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation_id, "parameters": parameters, "description": description}


_NAME = "$response.body#/name"

# POST /v1/collections → the new collection's name (CollectionOut.name).
CREATED_COLLECTION: dict[str, Any] = {
    "GetCollection": _link(
        "get_collection_v1_collections__collection__get", "the collection just created", collection=_NAME
    ),
    "UpsertDocuments": _link(
        "upsert_documents_v1_collections__collection__documents_post", "add documents to it", collection=_NAME
    ),
    "UploadFiles": _link("upload_files_v1_collections__collection__files_post", "upload files to it", collection=_NAME),
    "ListDocuments": _link(
        "list_documents_v1_collections__collection__documents_get", "list its documents", collection=_NAME
    ),
    "Search": _link("search_v1_collections__collection__search_post", "search it", collection=_NAME),
    "Answer": _link("answer_v1_collections__collection__answer_post", "ask it a question", collection=_NAME),
    "DeleteCollection": _link("delete_collection_v1_collections__collection__delete", "delete it", collection=_NAME),
}

# POST /v1/collections/{collection}/documents → the collection and the first
# document's id (UpsertResponse.collection, .results[0].id).
_UPSERTED = {"collection": "$response.body#/collection", "document_id": "$response.body#/results/0/id"}
UPSERTED_DOCUMENTS: dict[str, Any] = {
    "GetDocument": _link(
        "get_document_v1_collections__collection__documents__document_id__get",
        "the first document of the batch, with its chunks",
        **_UPSERTED,
    ),
    "DeleteDocument": _link(
        "delete_document_v1_collections__collection__documents__document_id__delete",
        "delete the first document of the batch",
        **_UPSERTED,
    ),
    "Search": _link(
        "search_v1_collections__collection__search_post",
        "search the collection",
        collection="$response.body#/collection",
    ),
}

# POST /v1/collections/{collection}/files → the job (JobOut.id) and the first
# file's document id (JobOut.collection, .files[0].document_id).
SUBMITTED_JOB: dict[str, Any] = {
    "GetJob": _link("get_job_v1_jobs__job_id__get", "the job's progress", job_id="$response.body#/id"),
    "GetDocument": _link(
        "get_document_v1_collections__collection__documents__document_id__get",
        "the first file's document (404 until the file is processed)",
        collection="$response.body#/collection",
        document_id="$response.body#/files/0/document_id",
    ),
}
