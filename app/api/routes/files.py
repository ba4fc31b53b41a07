from __future__ import annotations

import json

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse

from app.api.deps import ServiceDep, SettingsDep
from app.api.links import SUBMITTED_JOB
from app.api.schemas import ERROR_RESPONSES, CollectionName, JobOut
from app.errors import InvalidInput
from app.service import UploadedFile
from app.validation import check_json_value

MAX_ID_CHARS = 1024  # as for ids in the JSON routes

router = APIRouter(tags=["files"], responses=ERROR_RESPONSES)


def _json_form(value: str | None, what: str, kind: type):
    if value is None or value == "":
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        raise InvalidInput(f"{what} is not valid JSON") from None
    except RecursionError:  # nested past the parser's recursion limit (about 1,000 levels): was a 500
        raise InvalidInput(f"{what} is nested too deeply") from None
    if not isinstance(parsed, kind):
        raise InvalidInput(f"{what} must be a JSON {kind.__name__}")
    try:  # as the JSON routes' bodies (the metadata's size: the service checks it for every way in)
        check_json_value(parsed, what)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return parsed


@router.post(
    "/v1/collections/{collection}/files",
    status_code=202,
    response_model=JobOut,
    responses={202: {"links": SUBMITTED_JOB}},
)
async def upload_files(
    collection: CollectionName,
    service: ServiceDep,
    settings: SettingsDep,
    files: list[UploadFile] = File(min_length=1, description="one or more files: .txt, .md, .html, .docx, .pdf"),
    metadata: str | None = Form(default=None, description="JSON object applied to every file's document"),
    ids: str | None = Form(default=None, description="JSON list of document ids, one per file (default: file names)"),
):
    """Upload files; answers 202 with a job at once. Poll ``GET /v1/jobs/{id}``."""
    meta = _json_form(metadata, "metadata", dict)
    id_list = _json_form(ids, "ids", list)
    if id_list is not None and (
        len(id_list) != len(files) or not all(isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS for i in id_list)
    ):
        raise InvalidInput(f"ids must list one non-empty string of at most {MAX_ID_CHARS} characters per file")
    uploads = []
    for i, f in enumerate(files):
        data = await f.read(settings.max_file_bytes + 1)
        if len(data) > settings.max_file_bytes:
            error = f"the file is larger than the {settings.max_file_bytes:,}-byte limit"
            uploads.append(UploadedFile(f.filename or "", None, id_list[i] if id_list else None, error))
        else:
            uploads.append(UploadedFile(f.filename or "", data, id_list[i] if id_list else None))
        await f.close()
    job_id = await service.submit_files(collection, uploads, meta)
    return JSONResponse(await service.job_status(job_id), status_code=202)


@router.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
async def get_job(job_id: str, service: ServiceDep):
    return await service.job_status(job_id)
