"""The optional rerank stage: the top candidates of a search re-scored by a
model that reads the query and each passage together.

Two kinds, behind one :class:`Reranker` base:

- :class:`CrossEncoderReranker`: any transformers sequence-classification
  model (an ms-marco MiniLM cross-encoder, a BGE reranker, ...). The score is
  the single logit when ``num_labels == 1``, else the positive class's logit.
- :class:`LLMReranker`: a causal LM asked whether the passage meets the
  query, in the prompt format of Qwen3-Reranker. The score is
  P("yes") / (P("yes") + P("no")) of the next token, in 0..1.

Off unless ``reranker`` names a model (none ships offline). A local path is
loaded with ``local_files_only``: nothing is downloaded unless the setting is
a hub name, which then loads the way transformers always does (the hub or
its cache). One call at a time (a lock), on the search thread, on the CPU.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import torch

# Imported here, on the importing (main) thread: the loader runs on the
# search thread, and transformers' lazy module can fail a first import made
# from a worker thread (see app/service.py).
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from app.settings import Settings

logger = logging.getLogger("app.engine")

KINDS = ("cross-encoder", "llm")

# Qwen3-Reranker's prompt: a system turn that asks for "yes" or "no", the
# instruction, query and document in the user turn, and an empty thinking
# block, so the next token is the answer.
LLM_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
LLM_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
LLM_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
MIN_PASSAGE_TOKENS = 32  # what reranker_max_length must leave for query and passage after the LLM's prompt

# Class names that mean "relevant" in a cross-encoder's id2label.
POSITIVE_LABELS = ("relevant", "positive", "yes", "true", "entailment")


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped ``batch_size`` at a time in length order: each batch
    pads to a length close to its own rows'."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad(rows: list[dict[str, list[int]]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Tokenizer output rows padded into tensors (``input_ids`` with ``pad_id``,
    every other field with 0) and an attention mask."""
    width = max(len(row["input_ids"]) for row in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.full((len(rows), width), fill, dtype=torch.long)
    out["attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        size = len(row["input_ids"])
        span = slice(width - size, width) if left else slice(0, size)
        for key, values in row.items():
            if key != "attention_mask":
                out[key][n, span] = torch.tensor(values, dtype=torch.long)
        out["attention_mask"][n, span] = 1
    return out


class Reranker(ABC):
    """Scores (query, passage) pairs with one model, ``batch_size`` pairs per
    forward pass; a higher score means more relevant."""

    kind: str

    def __init__(self, model, tokenizer, *, max_length: int, batch_size: int, name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        limit = getattr(tokenizer, "model_max_length", None)
        # Tokenizers without a limit report a huge sentinel.
        self.max_length = min(max_length, limit) if isinstance(limit, int) and limit < 1_000_000 else max_length
        self.batch_size = batch_size
        self.name = name
        self.lock = threading.Lock()  # one model, one fast tokenizer: neither is safe to share between threads

    @abstractmethod
    def _rows(self, query: str, passages: Sequence[str]) -> list[dict[str, list[int]]]:
        """Token rows, one per passage, each at most ``max_length`` long."""

    @abstractmethod
    def _scores(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        """Scores of one batch of rows."""

    def score(self, query: str, passages: Sequence[str]) -> list[float]:
        """One score per passage, in the order given."""
        if not passages:
            return []
        started = time.perf_counter()
        scores = [0.0] * len(passages)
        with self.lock, torch.inference_mode():
            rows = self._rows(query, passages)
            for batch in _batches([len(r["input_ids"]) for r in rows], self.batch_size):
                for i, value in zip(batch, self._scores([rows[i] for i in batch]).tolist()):
                    scores[i] = float(value)
        logger.debug(
            "reranked %d passages (%s) in %.1f ms", len(passages), self.kind, (time.perf_counter() - started) * 1000
        )
        return scores


class CrossEncoderReranker(Reranker):
    """A sequence-classification model over the pair (query, passage)."""

    kind = "cross-encoder"

    def __init__(self, model, tokenizer, *, max_length: int, batch_size: int, name: str = ""):
        super().__init__(model, tokenizer, max_length=max_length, batch_size=batch_size, name=name)
        self.label = positive_label(model.config)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        self.input_names = [n for n in tokenizer.model_input_names if n != "attention_mask"]

    def _rows(self, query: str, passages: Sequence[str]) -> list[dict[str, list[int]]]:
        # longest_first: a long passage is cut before the query is.
        encoded = self.tokenizer([query] * len(passages), list(passages), truncation=True, max_length=self.max_length)
        return [{n: list(encoded[n][i]) for n in self.input_names if n in encoded} for i in range(len(passages))]

    def _scores(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        logits = self.model(**_pad(rows, self.pad_id)).logits
        return logits[:, self.label].float()


def positive_label(config) -> int:
    """The logit a cross-encoder's score is: the only one, the class its
    ``id2label`` names relevant, or the second of two."""
    num_labels = int(getattr(config, "num_labels", 1))
    if num_labels == 1:
        return 0
    names = {int(i): str(label).strip().lower() for i, label in (getattr(config, "id2label", None) or {}).items()}
    for wanted in POSITIVE_LABELS:
        for i, name in names.items():
            if name == wanted:
                return i
    if num_labels == 2:
        return 1
    raise ValueError(
        f"reranker: a sequence-classification model with {num_labels} labels ({', '.join(names.values())}) "
        "and none of them named as the relevant class; use a model with one logit or two classes"
    )


class LLMReranker(Reranker):
    """A causal LM asked "does this passage meet the query?"; the score is the
    probability of "yes" against "no" as its next token."""

    kind = "llm"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_length: int,
        batch_size: int,
        name: str = "",
        instruction: str = LLM_INSTRUCTION,
    ):
        super().__init__(model, tokenizer, max_length=max_length, batch_size=batch_size, name=name)
        self.instruction = instruction
        self.yes_id = answer_token(tokenizer, "yes")
        self.no_id = answer_token(tokenizer, "no")
        bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
        self.prefix = ([bos] if bos is not None else []) + self._ids(LLM_PREFIX)
        self.suffix = self._ids(LLM_SUFFIX)
        self.budget = self.max_length - len(self.prefix) - len(self.suffix)
        if self.budget < MIN_PASSAGE_TOKENS:
            raise ValueError(
                f"reranker_max_length {self.max_length} leaves {self.budget} tokens for query and passage "
                f"after the prompt's {len(self.prefix) + len(self.suffix)}; at least {MIN_PASSAGE_TOKENS} are needed"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        accepts = inspect.signature(model.forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
        self._positions = "position_ids" in accepts

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _rows(self, query: str, passages: Sequence[str]) -> list[dict[str, list[int]]]:
        bodies = [f"<Instruct>: {self.instruction}\n<Query>: {query}\n<Document>: {p}" for p in passages]
        # Cut from the end: a long passage loses its tail, the prompt's end stays.
        encoded = self.tokenizer(bodies, add_special_tokens=False, truncation=True, max_length=self.budget)
        return [{"input_ids": self.prefix + list(ids) + self.suffix} for ids in encoded["input_ids"]]

    def _scores(self, rows: list[dict[str, list[int]]]) -> torch.Tensor:
        # Left padding puts every row's last token in the last column, so only
        # that column's logits are computed; positions count real tokens only,
        # so a padded row scores as it would alone.
        inputs = _pad(rows, self.pad_id, left=True)
        if self._positions:
            inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**inputs, use_cache=False, **self._extra).logits[:, -1, :]
        pair = torch.stack([logits[:, self.no_id], logits[:, self.yes_id]], dim=-1).float()
        return torch.softmax(pair, dim=-1)[:, 1]


def answer_token(tokenizer, word: str) -> int:
    """The one token ``word`` is in the tokenizer's vocabulary."""
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"reranker: the tokenizer splits {word!r} into {len(ids)} tokens; an LLM reranker needs one")
    return int(ids[0])


def detect_kind(config, gguf: bool = False) -> str:
    """cross-encoder for a ``*ForSequenceClassification`` architecture, llm for
    a causal LM (a GGUF file is one)."""
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "cross-encoder"
    if gguf or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "llm"
    described = ", ".join(architectures) or f"model type {getattr(config, 'model_type', None)!r}"
    raise ValueError(
        f"reranker: cannot tell whether {described} is a cross-encoder or a causal LM; "
        "set reranker_kind to cross-encoder or llm"
    )


def model_source(name: str) -> tuple[str, dict]:
    """(what ``from_pretrained`` reads, its keyword arguments) for the
    ``reranker`` setting: a local directory or ``.gguf`` file, read offline,
    or a hub name. A name that starts like a path (/, ., ~) or ends in .gguf
    must exist: transformers would take it for a hub name and say so obscurely."""
    path = Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file() and path.suffix == ".gguf":
            return str(path.parent), {"gguf_file": path.name, "local_files_only": True}
        if path.is_dir():
            return str(path), {"local_files_only": True}
        raise ValueError(f"reranker: {path} is neither a model directory nor a .gguf file")
    if name.startswith(("/", ".", "~")) or name.endswith(".gguf"):
        raise FileNotFoundError(f"reranker: no file or directory {path}")
    return name, {}


def load_reranker(settings: Settings) -> Reranker | None:
    """The configured reranker, or None when ``reranker`` is empty (blocking:
    loads the weights)."""
    if not settings.reranker:
        return None
    started = time.perf_counter()
    source, kwargs = model_source(settings.reranker)
    config = AutoConfig.from_pretrained(source, **kwargs)
    kind: str = settings.reranker_kind
    if kind == "auto":
        kind = detect_kind(config, gguf="gguf_file" in kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    auto, backend = (
        (AutoModelForSequenceClassification, CrossEncoderReranker)
        if kind == "cross-encoder"
        else (AutoModelForCausalLM, LLMReranker)
    )
    model = auto.from_pretrained(source, dtype=torch.float32, **kwargs)
    reranker: Reranker = backend(
        model,
        tokenizer,
        max_length=settings.reranker_max_length,
        batch_size=settings.reranker_batch_size,
        name=settings.reranker,
    )
    reranker.score("warm up", ["warm up"])
    logger.info(
        "reranker %s (%s, max_length=%d, depth=%d) loaded in %.1fs",
        settings.reranker,
        kind,
        reranker.max_length,
        settings.rerank_depth,
        time.perf_counter() - started,
    )
    return reranker
