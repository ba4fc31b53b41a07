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

from app.engine.encoders import CHECKPOINT_NAME_PATTERN
from app.engine.retrieval import Retrieval
from app.validation import (
    COLLECTION_NAME_PATTERN,
    COLLECTION_NAME_RULE,
    FIELD_NAME_PATTERN,
    FIELD_NAME_RULE,
    MAIN_FIELD,
    MAX_CHOSEN_FIELDS,
    MAX_DEPTH,
    MAX_FIELD_WEIGHT,
    MAX_FIELDS,
    MAX_METADATA_BYTES,
    NOT_BLANK_PATTERN,
    TITLE_FIELD,
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

# A document field's name (``text`` is the main field; a ``fields`` object may not use it).
FieldName = Annotated[StrictStr, Field(pattern=FIELD_NAME_PATTERN, description=FIELD_NAME_RULE)]
FieldWeight = Annotated[float, Field(ge=0, le=MAX_FIELD_WEIGHT, allow_inf_nan=False)]
# Names other than field names are refused: the OpenAPI document says so too.
_ONLY_FIELD_NAMES: dict[str, Any] = {"additionalProperties": False}
FieldWeights = Annotated[
    dict[FieldName, FieldWeight], Field(max_length=MAX_CHOSEN_FIELDS, json_schema_extra=_ONLY_FIELD_NAMES)
]
FieldTexts = Annotated[dict[FieldName, NotBlankStr], Field(max_length=MAX_FIELDS, json_schema_extra=_ONLY_FIELD_NAMES)]
FIELDS_HELP = (
    f"the document fields searched: only chunks of these fields can come back, chosen before ranking like the "
    f"filter (so k hits still come back when they hold k chunks); '{MAIN_FIELD}' names the main text. "
    "Default: every field"
)
FIELD_WEIGHTS_HELP = (
    "{field: weight}, a field left out weighing 1: each hit's final score (its mode's score, after fusion) is "
    "multiplied by its field's weight, and the hits are ranked again by that product; a weight of 0 excludes the "
    "field before ranking. To let a boosted field climb into the top k, the best max(4k, 100) candidates (at most "
    "max(k, 1000)) are weighted, then cut to k. Dense cosines can be negative: a weight above 1 lowers those further"
)

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


class ReindexOut(BaseModel):
    state: Literal["running", "failed"]
    checkpoint: str | None = Field(description="the checkpoint it encodes with (null: the server's configured one)")
    progress: float = Field(description="share of the collection's passage ids re-encoded so far (0 to 1)")
    error: str | None = Field(default=None, description="why it stopped, when it failed")


class CollectionOut(BaseModel):
    name: str
    description: str | None
    created_at: float
    generation: int
    documents: int
    pending_documents: int
    chunks: int
    index: IndexOut | None = Field(default=None, description="None until the models are loaded")
    checkpoint: str | None = Field(
        default=None,
        description="the checkpoint its index and queries are encoded with: a directory under the data "
        "directory's checkpoints/ (null: the server's configured checkpoint)",
    )
    reindex: ReindexOut | None = Field(
        default=None, description="a re-index running (or the last one, if it failed); null: none"
    )


class ReindexRequest(Strict):
    checkpoint: StrictStr | None = Field(
        default=None,
        pattern=CHECKPOINT_NAME_PATTERN,
        description="a checkpoint directory's name under the data directory's checkpoints/ (e.g. one written by "
        "tuning), of the same vector dimension; null: the server's configured checkpoint",
    )


class CheckpointOut(BaseModel):
    name: str
    tuning: dict[str, Any] | None = Field(default=None, description="how it was tuned, if it was (its provenance)")
    created_at: float


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointOut]


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class DocumentIn(Strict):
    id: StrictStr | None = Field(default=None, min_length=1, max_length=1024)
    text: NotBlankStr = Field(description=f"the main text: its chunks are of field '{MAIN_FIELD}'")
    title: StrictStr | None = Field(
        default=None,
        max_length=10_000,
        description=f"shown in hits and prefixed to every chunk when encoded, not indexed on its own; "
        f"default: the '{TITLE_FIELD}' field, if any (which is also indexed on its own)",
    )
    fields: FieldTexts | None = Field(
        default=None,
        description=f"named text fields beside text ({{name: text}}, at most {MAX_FIELDS}; names: {FIELD_NAME_RULE}, "
        f"not '{MAIN_FIELD}'), each chunked and encoded like text, its chunks searchable by field. "
        "Text and fields together count against the server's MAX_DOCUMENT_CHARS",
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description=f"any JSON object: finite numbers, integers within 64 bits, at most {MAX_DEPTH} levels "
        f"deep and {MAX_METADATA_BYTES:,} bytes as JSON",
    )

    @field_validator("fields")
    @classmethod
    def _main_field_is_text(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and MAIN_FIELD in value:
            raise ValueError(f"'{MAIN_FIELD}' is the main field: give it as the document's text")
        return value


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


FIELD_OUT_HELP = f"the document field the chunk was cut from: '{MAIN_FIELD}' (the main text) or a named field"


class ChunkOut(BaseModel):
    chunk_id: int
    chunk_index: int = Field(description="position among all the document's chunks: text first, then each field")
    text: str
    char_start: int = Field(description="offsets into the chunk's field")
    char_end: int
    page: int | None = None
    heading: str | None = None
    field: str = Field(description=FIELD_OUT_HELP)


class DocumentOut(BaseModel):
    id: str
    title: str | None
    fields: dict[str, str] = Field(description="the named fields beside text, as stored")
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


SearchMode = Literal["colbert", "dense", "keyword", "hybrid"]
MODE_HELP = (
    "colbert: late interaction (MaxSim); dense: the encoder's pooled sentence vector (only for a checkpoint "
    "that has one); keyword: BM25; hybrid: all three signals' candidates, each scored by every signal and "
    "fused with the weights. Default: the server's SEARCH_MODE"
)
FUSION_HELP = (
    "hybrid: normalized (weighted sum of min-max normalised scores), sum (weighted sum of the scores on one "
    "scale: cosines per query vector, BM25 relative to the best match), rrf (weighted reciprocal ranks) or "
    "rescore (exact MaxSim ranks every signal's candidates); default: the server's HYBRID_FUSION"
)


class HybridWeights(Strict):
    """Each signal's weight in a hybrid search; a signal left out weighs 0."""

    colbert: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    dense: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)
    keyword: float = Field(default=0.0, ge=0, le=1000, allow_inf_nan=False)


class RetrievalChoices(Strict):
    """How a search or an answer retrieves: mode, filter, fusion, weights, fields."""

    mode: SearchMode | None = Field(default=None, description=MODE_HELP)
    filter: dict[str, Any] | None = None
    fusion: Literal["normalized", "sum", "rrf", "rescore"] | None = Field(default=None, description=FUSION_HELP)
    weights: HybridWeights | None = Field(
        default=None, description="hybrid: each signal's weight; default from the server's settings"
    )
    fields: list[FieldName] | None = Field(
        default=None, min_length=1, max_length=MAX_CHOSEN_FIELDS, description=FIELDS_HELP
    )
    field_weights: FieldWeights | None = Field(default=None, description=FIELD_WEIGHTS_HELP)

    def retrieval(self, rerank: bool | None = None) -> Retrieval:
        """These choices as the searcher takes them."""
        weights = self.weights.model_dump() if self.weights is not None else None
        return Retrieval(self.mode, self.filter, self.fusion, weights, self.fields, self.field_weights, rerank)


class SearchRequest(RetrievalChoices):
    query: NotBlankStr = Field(min_length=1, max_length=10_000)
    k: SearchK = 10
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
        description="higher is better: ColBERT MaxSim (colbert, hybrid rescore), the dense cosine (dense), BM25 "
        "(keyword) or the fused score (hybrid rrf, normalized, sum), times its field's weight when field_weights "
        "are given; when the response says reranked, the reranker's score instead "
        "(a cross-encoder's logit, or an LLM reranker's probability of yes, 0..1)"
    )
    rank: int
    title: str | None
    metadata: dict[str, Any]
    char_start: int
    char_end: int
    page: int | None = None
    heading: str | None = None
    field: str = Field(description=FIELD_OUT_HELP)


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


class AnswerRequest(RetrievalChoices):
    question: NotBlankStr = Field(min_length=1, max_length=4_000)
    k: AnswerK | None = Field(default=None, description="passages to retrieve; default from settings")
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
    field: str = Field(description=FIELD_OUT_HELP)


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


class TuneRequest(Strict):
    steps: StrictInt = Field(default=200, ge=1, le=10_000, description="training steps")
    seed: StrictInt = Field(default=0, ge=0, le=2**31 - 1, description="what every random draw follows")
    layers: StrictInt = Field(
        default=0, ge=0, le=24, description="top transformer layers trained too (changes the dense vectors)"
    )
    max_queries: StrictInt = Field(default=2048, ge=8, le=100_000, description="pseudo-queries drawn at most")
    reindex: StrictBool = Field(
        default=False,
        description="once written, re-index the collection with the new checkpoint. Tuning measured no gain on "
        "either benchmark (BENCHMARKS.md): measure it on your own queries first",
    )


class TuningJobOut(BaseModel):
    id: str
    state: Literal["running", "done", "failed"]
    config: dict[str, Any]
    reindex: bool
    checkpoint: str | None = Field(description="the checkpoint written (a name under checkpoints/), once done")
    result: dict[str, Any] | None = Field(
        description="held-out pseudo-query loss before and after, the step kept, passages and pseudo-queries used"
    )
    error: str | None
    created_at: float
    updated_at: float
