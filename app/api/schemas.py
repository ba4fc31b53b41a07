"""Request and response bodies."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from app.validation import (
    COLLECTION_NAME_PATTERN,
    COLLECTION_NAME_RULE,
    MAX_DEPTH,
    MAX_METADATA_BYTES,
    NOT_BLANK_PATTERN,
    check_json_value,
)

# Declared in the OpenAPI document, so generated clients and fuzzers know them
# (the service checks the same rule for every way in).
CollectionName = Annotated[str, Path(pattern=COLLECTION_NAME_PATTERN, description=COLLECTION_NAME_RULE)]
DocumentId = Annotated[str, Path(min_length=1, max_length=1024)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must hold more than whitespace")
    return value


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 10.0 as an integer: a client whose numbers are all
    # floats gets what 10 gets (1.5 is still refused).
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Text that must hold more than whitespace; the pattern states the same rule
# in the OpenAPI document (the validator gives the clearer message).
NotBlankStr = Annotated[StrictStr, AfterValidator(_not_blank), Field(json_schema_extra={"pattern": NOT_BLANK_PATTERN})]
# k of search and answer. The bounds sit before the validator: after it they
# reach the OpenAPI document as "ge"/"le", which no client or fuzzer reads.
SearchK = Annotated[StrictInt, Field(ge=1, le=1000), BeforeValidator(_whole_number)]
AnswerK = Annotated[StrictInt, Field(ge=1, le=50), BeforeValidator(_whole_number)]

# Rerank runs on the search thread that every search of the process shares:
# its work is bounded per request.
RERANK_TEXT_CHARS = 10_000
RERANK_TOTAL_CHARS = 1_000_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_json_values(cls, data: Any) -> Any:
        # Lone surrogates, NaN/Infinity, integers past 64 bits, deep nesting:
        # 422 here rather than a 500 from SQLite or the tokenizer later. The
        # request's own envelope (lists of documents) adds a few levels.
        check_json_value(data, "the request body", max_depth=MAX_DEPTH + 4)
        return data


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="machine-readable: not_found, validation_error, forbidden, ...")
    message: str
    details: Any = Field(default=None, description="validation errors: where and why (loc, message, type)")


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer (app/api/errors.py)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


# Declared on every router in place of FastAPI's default 422 body, which this
# server never sends: every 4xx/5xx has the JSON error shape.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "refused: invalid input, unknown name, no or read-only key"},
    "5XX": {"model": ErrorResponse, "description": "the server could not answer (store busy: retry)"},
}


class CollectionCreate(Strict):
    name: StrictStr = Field(pattern=COLLECTION_NAME_PATTERN, description=COLLECTION_NAME_RULE)
    description: StrictStr | None = Field(default=None, max_length=10_000)


class IndexOut(BaseModel):
    kind: str = Field(description="the backend's tier, e.g. empty, exact or plaid")
    passages: int = Field(description="indexed passages, deleted ones not yet merged away included")
    segments: int
    tokens: int = Field(description="token vectors stored")
    bytes: int = Field(description="index size on disk")


class CollectionOut(BaseModel):
    name: str
    description: str | None
    created_at: float
    generation: int
    documents: int
    pending_documents: int
    chunks: int
    index: IndexOut | None = Field(default=None, description="None until the models are loaded")


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class DocumentIn(Strict):
    id: StrictStr | None = Field(default=None, min_length=1, max_length=1024)
    text: NotBlankStr
    title: StrictStr | None = Field(default=None, max_length=10_000)
    metadata: dict[str, Any] | None = Field(
        default=None,
        description=f"any JSON object: finite numbers, integers within 64 bits, at most {MAX_DEPTH} levels "
        f"deep and {MAX_METADATA_BYTES:,} bytes as JSON",
    )


class UpsertRequest(Strict):
    documents: list[DocumentIn] = Field(min_length=1)
    wait: StrictBool = True


class UpsertResult(BaseModel):
    id: str
    status: Literal["indexed", "pending", "unchanged", "superseded", "failed"]
    error: str | None = None


class UpsertResponse(BaseModel):
    collection: str
    results: list[UpsertResult]


class ChunkOut(BaseModel):
    chunk_id: int
    chunk_index: int
    text: str
    char_start: int
    char_end: int
    page: int | None = None
    heading: str | None = None


class DocumentOut(BaseModel):
    id: str
    title: str | None
    metadata: dict[str, Any]
    state: str = Field(description="live, pending (not indexed yet) or failed (see error)")
    error: str | None = Field(default=None, description="why indexing this version failed")
    created_at: float
    updated_at: float
    chunks: list[ChunkOut]


class DocumentSummary(BaseModel):
    id: str
    title: str | None
    metadata: dict[str, Any]
    chunks: int
    created_at: float
    updated_at: float


class DocumentPage(BaseModel):
    documents: list[DocumentSummary]
    total: int
    limit: int
    offset: int


class SearchRequest(Strict):
    query: NotBlankStr = Field(min_length=1, max_length=10_000)
    k: SearchK = 10
    mode: Literal["colbert", "keyword", "hybrid"] = "colbert"
    filter: dict[str, Any] | None = None
    fusion: Literal["rrf", "normalized", "rescore"] | None = None
    rerank: StrictBool | None = Field(
        default=None,
        description="false: skip the rerank stage; default: on when the server has a reranker configured "
        "(it re-scores the top rerank_depth candidates, at least k)",
    )


class SearchHitOut(BaseModel):
    document_id: str
    chunk_id: int
    chunk_index: int
    text: str
    score: float = Field(
        description="higher is better: ColBERT MaxSim (colbert, hybrid rescore), BM25 (keyword) or the fused "
        "score (hybrid rrf, normalized); when the response says reranked, the reranker's score instead "
        "(a cross-encoder's logit, or an LLM reranker's probability of yes, 0..1)"
    )
    rank: int
    title: str | None
    metadata: dict[str, Any]
    char_start: int
    char_end: int
    page: int | None = None
    heading: str | None = None


class SearchResponse(BaseModel):
    query: str
    k: int
    mode: str
    reranked: bool = Field(description="whether the rerank stage ordered and scored the results")
    results: list[SearchHitOut]
    took_ms: float


class RerankRequest(Strict):
    query: StrictStr = Field(min_length=1, max_length=10_000)
    documents: list[Annotated[StrictStr, Field(max_length=RERANK_TEXT_CHARS)]] = Field(
        min_length=1,
        max_length=1000,
        description=f"texts to score, each at most {RERANK_TEXT_CHARS:,} characters, "
        f"{RERANK_TOTAL_CHARS:,} in all (the encoder reads only the first few hundred tokens of each)",
    )

    @field_validator("documents")
    @classmethod
    def _bounded_total(cls, value: list[str]) -> list[str]:
        total = sum(len(t) for t in value)
        if total > RERANK_TOTAL_CHARS:
            raise ValueError(f"documents hold {total:,} characters in all; at most {RERANK_TOTAL_CHARS:,} are allowed")
        return value


class RerankResult(BaseModel):
    index: int
    score: float
    text: str


class RerankResponse(BaseModel):
    query: str
    results: list[RerankResult]


class JobFileOut(BaseModel):
    filename: str
    document_id: str
    state: Literal["queued", "added", "unchanged", "failed"]
    chunks: int
    error: str | None


class JobOut(BaseModel):
    id: str
    collection: str
    state: Literal["queued", "running", "done", "failed"]
    files_total: int
    files_done: int
    chunks_total: int
    chunks_done: int
    counts: dict[str, int]
    created_at: float
    files: list[JobFileOut]


class AnswerRequest(Strict):
    question: NotBlankStr = Field(min_length=1, max_length=4_000)
    k: AnswerK | None = Field(default=None, description="passages to retrieve; default from settings")
    mode: Literal["colbert", "keyword", "hybrid"] = "colbert"
    filter: dict[str, Any] | None = None
    fusion: Literal["rrf", "normalized", "rescore"] | None = None
    stream: StrictBool = Field(default=False, description="server-sent events: token, citations, hallucination, done")


class ContextOut(BaseModel):
    document_id: str
    chunk_id: int
    chunk_index: int
    text: str
    score: float
    rank: int
    title: str | None
    metadata: dict[str, Any]
    page: int | None = None
    heading: str | None = None


class CitationOut(ContextOut):
    number: int = Field(description="1-based position in `context`, as in the prompt's [n]")
    source: Literal["model", "attribution"] = Field(
        description="model: marked by the LM and confirmed; attribution: matched by ColBERT MaxSim"
    )


class SentenceSupportOut(BaseModel):
    text: str
    score: float
    label: str


class SupportOut(BaseModel):
    score: float = Field(description="0..1, how well the retrieved passages support the answer")
    label: Literal["supported", "unsupported"]
    threshold: float
    sentences: list[SentenceSupportOut]


class AnswerResponse(BaseModel):
    question: str
    answer: str
    citations: list[CitationOut]
    hallucination: SupportOut | None
    context: list[ContextOut]
    model: str | None
    took_ms: dict[str, float]
    note: str | None = None
