from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from app.answer.service import AnswerService
from app.api.errors import error_body
from app.api.schemas import ERROR_RESPONSES, AnswerRequest, AnswerResponse, CollectionName, ErrorResponse
from app.errors import ServerError

log = logging.getLogger(__name__)
router = APIRouter(tags=["answer"], responses=ERROR_RESPONSES)


def get_answers(request: Request) -> AnswerService:
    return request.app.state.answers


AnswersDep = Annotated[AnswerService, Depends(get_answers)]


def _sse(event: str, data) -> bytes:
    # ASCII JSON: text can hold U+2028, U+2029 or U+0085, which clients that
    # split lines with str.splitlines (httpx among them) take for line ends.
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=True)}\n\n".encode()


@router.post(
    "/v1/collections/{collection}/answer",
    response_model=AnswerResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "with stream=true: server-sent events"},
        422: {
            "model": ErrorResponse,
            "description": "invalid input, or (answer_unsupported=refuse) an answer under the support threshold",
        },
        503: {"model": ErrorResponse, "description": "no answer LM could be loaded (search still works)"},
    },
)
async def answer(collection: CollectionName, body: AnswerRequest, answers: AnswersDep):
    """Answer a question from the collection: retrieve ``k`` chunks, generate
    with the configured LM (DSPy program), cite the chunks used, and score how
    well they support the answer (per sentence and overall)."""
    k = body.k or answers.settings.answer_k
    if not body.stream:
        return await answers.answer(collection, body.question, k, body.retrieval())

    events = answers.stream(collection, body.question, k, body.retrieval())
    # Errors before the first event (unknown collection, no LM) are plain
    # JSON errors with their status; later ones become an `error` event.
    first = await anext(events)

    async def body_iter() -> AsyncIterator[bytes]:
        yield _sse(*first)
        try:
            async for event, data in events:
                yield _sse(event, data)
        except ServerError as exc:
            yield _sse("error", error_body(exc.code, exc.message, exc.details))
        except Exception:
            log.exception("answer stream failed")
            yield _sse("error", error_body("internal_error", "answer generation failed"))

    return StreamingResponse(
        body_iter(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
