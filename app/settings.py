"""Server settings, read from ``COLBERT_SERVER_*`` environment variables or ``.env``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _models_dir_for(fields: dict) -> Path:
    """models_dir when unset: data_dir/models (resolved with data_dir, in Settings._check)."""
    return Path(fields.get("data_dir", "data")) / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COLBERT_SERVER_", env_file=".env", extra="ignore")

    environment: Literal["development", "production", "test"] = "development"
    data_dir: Path = Path("data")
    # Where the default models are built or exported on first start; unset
    # means data_dir/models. The Docker image bakes them into /opt/models.
    models_dir: Path = Field(default_factory=_models_dir_for)

    # Model: empty means the default MiniLM checkpoint built under data_dir on
    # first start. Otherwise a local directory or a hub name (e.g.
    # colbert-ir/colbertv2.0), which needs the hub or a local cache.
    checkpoint: str = ""
    query_augmentation: bool | None = None  # None: what the checkpoint says
    marker_tokens: bool | None = None
    doc_maxlen: int | None = None
    query_maxlen: int | None = None
    torch_threads: int = Field(default=0, ge=0, description="0: torch's default")
    encoder_runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"

    # Where vectors live (app/engine/backend.py). ``plaid``: PLAID segment
    # files under data_dir. ``qdrant``: a Qdrant server or cluster
    # (``qdrant_url``) or qdrant-client's embedded local mode in a directory
    # (``qdrant_path``: tests and single-process trials; one process only).
    index_backend: Literal["plaid", "qdrant"] = "plaid"
    qdrant_url: str = ""
    qdrant_path: Path | None = None
    qdrant_api_key: str = ""
    qdrant_prefix: str = Field(
        default="colbert", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Qdrant collection name prefix"
    )
    qdrant_shards: int = Field(default=1, ge=1, le=1024)
    qdrant_replication_factor: int = Field(default=1, ge=1, le=16)
    qdrant_write_consistency: str = Field(
        default="1",
        pattern=r"^([1-9][0-9]?|majority|all)$",
        description="replicas that acknowledge a write: a number, majority or all",
    )
    qdrant_read_consistency: str = Field(
        default="1",
        pattern=r"^([1-9][0-9]?|majority|quorum|all)$",
        description="replicas a search asks: a number, majority, quorum or all",
    )
    qdrant_on_disk: bool = Field(
        default=False, description="token vectors and payload on disk (memory-mapped) rather than in RAM"
    )
    qdrant_vector_storage: Literal["float32", "float16", "int8"] = Field(
        default="float16",
        description="token vectors: float32, float16, or float16 plus int8 scalar quantization held in RAM",
    )
    qdrant_prefetch: int = Field(
        default=256,
        ge=0,
        le=10_000,
        description="candidates from each first stage (dense, sparse) that MaxSim rescores; 0: MaxSim scans every passage",
    )
    qdrant_timeout_s: int = Field(default=60, ge=1)
    # The stateless tier (app/stateless.py): collections, documents and chunks
    # in Qdrant too, so any number of servers share them; needs index_backend qdrant.
    stateless: bool = False
    # What this process does: ``all``; ``api`` (serves requests, takes no
    # upload jobs, and with the single-node catalog never takes the writer
    # lease); ``ingest`` (drains the upload jobs of its data directory, and
    # with the single-node catalog indexes).
    server_role: Literal["all", "api", "ingest"] = "all"

    # Index lifecycle.
    exact_search_max_passages: int = Field(default=1024, ge=0)
    rebuild_growth_factor: float = Field(default=4.0, gt=0)
    rebuild_deleted_share: float = Field(default=0.3, gt=0, le=1)
    plaid_max_centroids: int = Field(default=32768, ge=16)
    segment_max_passages: int = Field(default=200_000, ge=1000)
    commit_max_chunks: int = Field(default=4096, ge=1)
    commit_target_s: float = Field(default=1.0, gt=0)
    snapshot_cache_bytes: int = Field(default=8 << 30, ge=0, description="0: no limit")
    snapshot_refresh_s: float = Field(
        default=1.0,
        ge=0,
        description="how often each worker loads its cached collections' new generations in the background (0: only when searched)",
    )
    writer_poll_interval_s: float = Field(default=0.1, gt=0)
    writer_stall_s: float = Field(
        default=30.0, gt=0, description="a writer without a sign of life this long shows as stalled in /ready"
    )
    writer_overlap: bool = Field(
        default=True,
        description="land each batch (compression, files, SQLite) on a second thread while the next is encoded",
    )
    kmeans_niters: int = Field(default=4, ge=1)
    ncells: int | None = None
    ndocs: int | None = None
    centroid_score_threshold: float | None = None
    # Search (app/engine/search.py). A request may name its own mode, fusion
    # and weights; these are the defaults, chosen from measurements on two
    # datasets (BENCHMARKS.md, "Retrieval quality").
    search_mode: Literal["colbert", "dense", "keyword", "hybrid"] = "colbert"
    hybrid_fusion: Literal["normalized", "sum", "rrf", "rescore"] = "rrf"
    hybrid_weight_colbert: float = Field(default=1.0, ge=0, le=1000)
    hybrid_weight_dense: float = Field(default=1.0, ge=0, le=1000)
    hybrid_weight_keyword: float = Field(default=0.0, ge=0, le=1000)
    hybrid_depth: int = Field(default=50, ge=1, le=1000, description="candidates taken from each signal")
    chunker: Literal["sentence", "semantic"] = "sentence"
    # The rerank stage (app/engine/rerank.py): the top rerank_depth candidates
    # of a search re-scored by a cross-encoder or an LLM reranker. Empty: off
    # (no such model ships offline). A local model directory or .gguf file, or
    # a hub name (e.g. cross-encoder/ms-marco-MiniLM-L6-v2 or
    # Qwen/Qwen3-Reranker-0.6B), which needs the hub or a local cache.
    reranker: str = ""
    reranker_kind: Literal["auto", "cross-encoder", "llm"] = Field(
        default="auto",
        description="auto: a *ForSequenceClassification model is a cross-encoder, a causal LM an LLM reranker",
    )
    rerank_depth: int = Field(
        default=30, ge=1, le=1000, description="top candidates of a search the reranker re-scores"
    )
    reranker_max_length: int = Field(
        default=512, ge=16, description="tokens per (query, passage) pair, prompt included"
    )
    reranker_batch_size: int = Field(default=16, ge=1, description="pairs per forward pass")

    # Requests.
    max_document_chars: int = Field(default=1_000_000, ge=1)
    max_file_bytes: int = Field(default=20_000_000, ge=1)
    # Uploaded files are parsed in a child process within these limits; a file
    # that breaks one fails with the reason and the queue moves on.
    extract_timeout_s: float = Field(default=120.0, gt=0, description="wall-clock limit of one file's extraction")
    extract_memory_mb: int = Field(
        default=2048, ge=0, description="resident memory of the extractor process; past it the file fails; 0: none"
    )
    extract_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU priority of the extractor below the server's: parsing yields to searches",
    )
    max_batch_documents: int = Field(default=10_000, ge=1)
    upsert_wait_timeout_s: float = Field(default=600.0, gt=0)
    default_collection: str = "default"

    # Answers (app/answer): the LM and the hallucination check.
    # The LM: empty = the bundled SmolLM2-135M-Instruct (offline); otherwise a
    # LiteLLM model name, e.g. "openai/<model>" with answer_lm_base_url for an
    # OpenAI-compatible server (vLLM, llama.cpp, Ollama's /v1), or a hosted one.
    answer_lm: str = ""
    answer_lm_base_url: str | None = None
    answer_lm_api_key: SecretStr | None = None
    answer_lm_retries: int = Field(default=2, ge=0)
    # Seconds a LiteLLM call may take (each try); a stalled provider must not
    # hold the answer thread, which every answer and check waits for.
    answer_lm_timeout: float = Field(default=60.0, gt=0)
    # A local transformers causal LM directory or .gguf file instead of the bundled one.
    answer_lm_path: str = ""
    answer_max_new_tokens: int = Field(default=64, ge=1, le=4096)
    answer_repetition_penalty: float = Field(default=1.0, ge=1.0, le=2.0, description="local LMs only")
    answer_k: int = Field(default=5, ge=1, le=50)
    answer_passage_chars: int = Field(default=1200, ge=50, description="each passage is cut to this many characters")
    # Load the LM (and the hallucination scorer) at start-up, in the
    # background; false loads them on the first answer request.
    answer_preload: bool = True
    # Under the hallucination threshold: "flag" returns the answer labelled
    # unsupported; "refuse" withholds it (422 answer_unsupported).
    answer_unsupported: Literal["flag", "refuse"] = "flag"
    # The hallucination check (app/answer/hallucination.py). Empty model = the
    # bundled MiniLM token-alignment scorer; otherwise a local path or hub name
    # of a sequence-classification model (NLI / cross-encoder / vectara's HHEM,
    # which needs trust_remote_code), exported to ONNX int8 on first use.
    hallucination_model: str = ""
    hallucination_trust_remote_code: bool = False
    # An existing .onnx file to load instead (its folder holds the tokenizer).
    hallucination_onnx: str = ""
    hallucination_threshold: float = Field(default=0.5, ge=0, le=1)
    hallucination_threads: int = Field(default=0, ge=0, description="onnxruntime intra-op threads; 0: its default")

    # Security (API keys, CORS, request limits).
    # API keys (comma-separated or a JSON list). When any is set, every request
    # needs "Authorization: Bearer <key>" except /health, /ready and the web
    # page's shell (/ and /ui/*). Read-only keys may GET and search, answer and
    # rerank; everything else needs a read-write key.
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    read_only_api_keys: Annotated[list[SecretStr], NoDecode] = []
    # /docs, /redoc and /openapi.json hold no data; false puts them behind a key too.
    public_docs: bool = True
    # Origins allowed to call the API from a browser (CORS); empty: no CORS headers.
    cors_origins: Annotated[list[str], NoDecode] = []
    # Host names this server answers to (the Host header; "*" any, "*.example.com"
    # any subdomain of example.com, not example.com itself). Loopback only by default: a web page that
    # points its own domain at this machine's address (DNS rebinding) gets 400.
    # Behind a proxy or on a LAN, name the hosts clients use.
    allowed_hosts: Annotated[list[str], NoDecode] = ["localhost", "127.0.0.1", "::1"]
    # Request bodies over these sizes get 413 before they are read in full.
    max_request_bytes: int = Field(default=100_000_000, ge=1, description="any body but the ones below")
    max_upload_bytes: int = Field(default=200_000_000, ge=1, description="a multipart upload, all files together")
    max_query_bytes: int = Field(default=4_000_000, ge=1, description="a search, answer or rerank request")
    # Requests in progress per kind of route; one more gets 503 with
    # Retry-After rather than a place in an unbounded queue.
    max_concurrent_searches: int = Field(default=64, ge=1, description="search and rerank")
    max_concurrent_answers: int = Field(default=8, ge=1)
    max_concurrent_writes: int = Field(default=32, ge=1, description="upserts, uploads and deletes")

    # Operations (logs, metrics).
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True  # one line per request: method, route, status, duration

    @field_validator("api_keys", "read_only_api_keys", "cors_origins", "allowed_hosts", mode="before")
    @classmethod
    def _split_list(cls, value):
        """A JSON list or comma-separated values, as environment variables give them."""
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else text.split(",")
        if isinstance(value, (list, tuple)):
            value = [v.strip() if isinstance(v, str) else v for v in value]
            return [v for v in value if v != ""]
        return value

    @field_validator("models_dir", mode="before")
    @classmethod
    def _models_dir_none(cls, value, info: ValidationInfo):
        return _models_dir_for(info.data) if value is None else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.models_dir = Path(self.models_dir).expanduser().resolve()
        if self.index_backend == "qdrant" and bool(self.qdrant_url) == (self.qdrant_path is not None):
            raise ValueError("index_backend qdrant needs one of qdrant_url (a server or cluster) or qdrant_path")
        if self.stateless and self.index_backend != "qdrant":
            raise ValueError("stateless needs index_backend qdrant (collections and documents live in Qdrant)")
        if self.qdrant_path is not None:
            self.qdrant_path = Path(self.qdrant_path).expanduser().resolve()
        return self

    @property
    def database_path(self) -> Path:
        return self.data_dir / "server.sqlite3"

    @property
    def default_checkpoint_dir(self) -> Path:
        return self.models_dir / "colbert-minilm-l6"

    @property
    def index_root(self) -> Path:
        return self.data_dir / "indexes"
