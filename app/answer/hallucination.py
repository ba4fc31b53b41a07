"""Hallucination scores: how well the retrieved context supports each sentence of an answer.

Two methods, both run as ONNX (int8) with onnxruntime:

- **token alignment** (the default, offline, from the bundled all-MiniLM-L6-v2):
  each answer sentence and each context passage is encoded on its own into
  L2-normalised token vectors. Every content token of the sentence (no special
  tokens, punctuation or English stop words) takes its best cosine similarity
  over all context tokens; the sentence's support is the mean of those, mapped
  linearly to 0..1 by two constants measured on the msmarco-mini check set
  (``bench/hallucination.py``). A copied or paraphrased claim finds close
  tokens in the context; a claim about something else does not. The answer's
  score is the lowest sentence score: one unsupported sentence makes the
  answer unsupported.
- **pair classification** (``HALLUCINATION_MODEL``: an NLI / cross-encoder /
  HHEM-style sequence-classification model): the probability of the
  supporting class for each (context, sentence) pair, the best context per
  sentence, the lowest sentence for the answer.

``models/export_hallucination_model.py`` exports either model to ONNX and
quantizes it; :func:`load_scorer` does that on first use.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from app.answer.runners import OnnxRunner, Runner, length_batches, pad_rows

if TYPE_CHECKING:
    from app.settings import Settings

log = logging.getLogger("app.answer")

SUPPORTED = "supported"
UNSUPPORTED = "unsupported"

# Sentence support = the mean best cosine mapped linearly to 0..1 and clipped:
# ALIGNMENT_LOW is the median mean best cosine of a sentence about something
# else (unrelated to the context), ALIGNMENT_HIGH that of a sentence copied
# from the context, both measured on the calibration set of
# bench/hallucination.py (seed 1; the figures in BENCHMARKS.md are measured on
# another seed). A linear map keeps the int8-vs-fp32 differences as small as
# they are in cosine units; a fitted logistic would multiply them near its
# centre (the two classes are separable there, so its slope runs away).
ALIGNMENT_LOW = 0.24
ALIGNMENT_HIGH = 0.90
# Sentences shorter than this many words (a stray "Dr." or "in 2010." from the
# sentence splitter) are joined to the sentence before them.
MIN_SENTENCE_WORDS = 3
# Long texts are encoded in windows of the model's max length that overlap by this many tokens.
WINDOW_STRIDE = 32


@dataclass(frozen=True)
class SentenceSupport:
    text: str
    score: float  # 0..1, higher = better supported by the context
    label: str  # "supported" | "unsupported"


@dataclass(frozen=True)
class SupportReport:
    score: float  # overall 0..1
    label: str  # "supported" | "unsupported" (score >= threshold)
    threshold: float
    sentences: list[SentenceSupport]


class HallucinationScorer(Protocol):
    name: str

    def score(self, answer: str, contexts: list[str]) -> SupportReport: ...


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (NLTK punkt, as llama-index ships it), fragments joined to their neighbour."""
    from llama_index.core.utils import globals_helper

    pieces = [p.strip() for p in globals_helper.punkt_tokenizer.tokenize(text or "")]
    sentences: list[str] = []
    for piece in filter(None, pieces):
        if sentences and len(piece.split()) < MIN_SENTENCE_WORDS:
            sentences[-1] = f"{sentences[-1]} {piece}"
        elif sentences and len(sentences[-1].split()) < MIN_SENTENCE_WORDS:
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


def label_for(score: float, threshold: float) -> str:
    return SUPPORTED if score >= threshold else UNSUPPORTED


def build_report(sentences: list[str], scores: Sequence[float], threshold: float) -> SupportReport:
    """Per-sentence labels and the overall score: the weakest sentence (1.0 when nothing is claimed)."""
    items = [SentenceSupport(text, float(s), label_for(float(s), threshold)) for text, s in zip(sentences, scores)]
    overall = min((item.score for item in items), default=1.0)
    return SupportReport(score=overall, label=label_for(overall, threshold), threshold=threshold, sentences=items)


class TokenAlignmentScorer:
    """Support by token alignment of an answer sentence with the context (see the module docstring)."""

    name = "token-alignment"

    def __init__(self, tokenizer, runner: Runner, *, threshold: float, max_length: int, input_names: Sequence[str]):
        from llama_index.core.utils import globals_helper

        self.tokenizer = tokenizer
        self.runner = runner
        self.threshold = threshold
        self.max_length = max_length
        self.input_names = list(input_names)
        self.stopwords = frozenset(globals_helper.stopwords)
        self.lock = threading.Lock()

    def _windows(self, texts: Sequence[str]):
        """Token windows of every text: the encoding, the rows, the text each window belongs to, and which
        positions to keep.

        A kept position is a real token (no special token) that no earlier window of the same text covers.
        """
        encoded = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.max_length,
            stride=WINDOW_STRIDE,
            return_overflowing_tokens=True,
            return_special_tokens_mask=True,
            return_offsets_mapping=True,
        )
        owners = list(encoded["overflow_to_sample_mapping"])
        rows, keep = [], []
        for i, owner in enumerate(owners):
            rows.append({name: list(encoded[name][i]) for name in self.input_names})
            special = encoded["special_tokens_mask"][i]
            first = i == 0 or owners[i - 1] != owner
            skip = 0 if first else WINDOW_STRIDE
            mask, seen = [], 0
            for is_special in special:
                if is_special:
                    mask.append(False)
                    continue
                mask.append(seen >= skip)
                seen += 1
            keep.append(mask)
        return encoded, rows, owners, keep

    def _encode(self, rows: list[dict[str, list[int]]]) -> list[np.ndarray]:
        """Token vectors of every window, in batches of similar length."""
        out: list[np.ndarray] = [np.empty(0)] * len(rows)
        pad_id = self.tokenizer.pad_token_id or 0
        for batch in length_batches(rows):
            vectors = self.runner(pad_rows([rows[i] for i in batch], self.input_names, pad_id))
            for j, i in enumerate(batch):
                out[i] = vectors[j, : len(rows[i]["input_ids"])]
        return out

    def _content_mask(self, text: str, offsets: list[tuple[int, int]], word_ids: list[int | None]) -> list[bool]:
        """Tokens of words that carry content: not a stop word, not punctuation only."""
        spans: dict[int, tuple[int, int]] = {}
        for word, (start, end) in zip(word_ids, offsets):
            if word is not None:
                lo, hi = spans.get(word, (start, end))
                spans[word] = (min(lo, start), max(hi, end))
        content = {}
        for word, (start, end) in spans.items():
            token = text[start:end].lower()
            content[word] = any(c.isalnum() for c in token) and token not in self.stopwords
        return [word is not None and content[word] for word in word_ids]

    def token_support(self, sentences: Sequence[str], contexts: Sequence[str]) -> list[np.ndarray]:
        """For each sentence, the best cosine similarity over all context tokens of each of its content tokens."""
        contexts = [c for c in contexts if c and c.strip()]
        if not sentences:
            return []
        if not contexts:
            return [np.zeros(0, dtype=np.float32) for _ in sentences]
        _, context_rows, _, context_keep = self._windows(contexts)
        encoding, sentence_rows, owners, sentence_keep = self._windows(sentences)
        vectors = self._encode(sentence_rows + context_rows)
        sentence_vectors, context_vectors = vectors[: len(sentence_rows)], vectors[len(sentence_rows) :]
        context_matrix = np.concatenate([v[np.array(k, dtype=bool)] for v, k in zip(context_vectors, context_keep)])
        if not len(context_matrix):  # contexts of special tokens only (control characters): nothing supports
            return [np.zeros(0, dtype=np.float32) for _ in sentences]
        per_sentence: list[list[np.ndarray]] = [[] for _ in sentences]
        fallback: list[list[np.ndarray]] = [[] for _ in sentences]
        for i, owner in enumerate(owners):
            keep = np.array(sentence_keep[i])
            content = np.array(
                self._content_mask(sentences[owner], encoding["offset_mapping"][i], encoding.word_ids(i))
            )
            best = (sentence_vectors[i] @ context_matrix.T).max(axis=1)
            per_sentence[owner].append(best[keep & content])
            fallback[owner].append(best[keep])
        result = []
        for owner in range(len(sentences)):
            sims = np.concatenate(per_sentence[owner]) if per_sentence[owner] else np.zeros(0, dtype=np.float32)
            if sims.size == 0:  # only stop words ("It is.")
                sims = np.concatenate(fallback[owner]) if fallback[owner] else sims
            result.append(sims.astype(np.float32))
        return result

    @staticmethod
    def calibrate(mean_similarity: float) -> float:
        return min(1.0, max(0.0, (mean_similarity - ALIGNMENT_LOW) / (ALIGNMENT_HIGH - ALIGNMENT_LOW)))

    def sentence_scores(self, sentences: Sequence[str], contexts: Sequence[str]) -> list[float]:
        with self.lock:
            support = self.token_support(sentences, contexts)
        return [self.calibrate(float(s.mean())) if s.size else 0.0 for s in support]

    def score(self, answer: str, contexts: list[str]) -> SupportReport:
        sentences = split_sentences(answer)
        return build_report(sentences, self.sentence_scores(sentences, contexts), self.threshold)


class PairClassifierScorer:
    """Support = P(supporting class | context, sentence) of a sequence-classification model.

    Contexts longer than the model's max length are read in overlapping windows; a sentence's score is its best
    window of its best context. Models that read a pair as one prompt (HHEM) get ``pair_template``.
    """

    name = "pair-classification"

    def __init__(
        self,
        tokenizer,
        runner: Runner,
        *,
        threshold: float,
        max_length: int,
        input_names: Sequence[str],
        support_index: int | None,
        pair_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.runner = runner
        self.threshold = threshold
        self.max_length = max_length
        self.input_names = list(input_names)
        self.support_index = support_index
        self.pair_template = pair_template
        self.lock = threading.Lock()

    def _probabilities(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float64)
        if self.support_index is None:  # one logit: sigmoid
            return 1.0 / (1.0 + np.exp(-logits[:, 0]))
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted[:, self.support_index] / shifted.sum(axis=1)

    def _pair_rows(self, sentences: Sequence[str], contexts: Sequence[str]):
        """Model inputs for every (context window, sentence) pair and the sentence each belongs to."""
        if self.pair_template is None:
            pairs = [(c, i) for i in range(len(sentences)) for c in contexts]
            encoded = self.tokenizer(
                [c for c, _ in pairs],
                [sentences[i] for _, i in pairs],
                truncation="only_first",
                max_length=self.max_length,
                stride=WINDOW_STRIDE,
                return_overflowing_tokens=True,
            )
            owners = [pairs[p][1] for p in encoded["overflow_to_sample_mapping"]]
            return [{n: list(encoded[n][i]) for n in self.input_names} for i in range(len(owners))], owners
        prompts, owners = [], []
        for i, sentence in enumerate(sentences):
            rest = len(self.tokenizer(self.pair_template.format(premise="", hypothesis=sentence))["input_ids"])
            budget = max(16, self.max_length - rest)
            for context in contexts:
                ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
                for start in range(0, max(1, len(ids) - WINDOW_STRIDE), max(1, budget - WINDOW_STRIDE)):
                    premise = self.tokenizer.decode(ids[start : start + budget])
                    prompts.append(self.pair_template.format(premise=premise, hypothesis=sentence))
                    owners.append(i)
        encoded = self.tokenizer(prompts, truncation=True, max_length=self.max_length)
        return [{n: list(encoded[n][i]) for n in self.input_names} for i in range(len(prompts))], owners

    def sentence_scores(self, sentences: Sequence[str], contexts: Sequence[str]) -> list[float]:
        contexts = [c for c in contexts if c and c.strip()]
        if not sentences or not contexts:
            return [0.0] * len(sentences)
        with self.lock:
            rows, owners = self._pair_rows(sentences, contexts)
            pad_id = self.tokenizer.pad_token_id or 0
            probabilities = np.zeros(len(rows))
            for batch in length_batches(rows):
                logits = self.runner(pad_rows([rows[i] for i in batch], self.input_names, pad_id))
                probabilities[batch] = self._probabilities(logits)
        best = np.zeros(len(sentences))
        for window, owner in enumerate(owners):
            best[owner] = max(best[owner], probabilities[window])
        return [float(b) for b in best]

    def score(self, answer: str, contexts: list[str]) -> SupportReport:
        sentences = split_sentences(answer)
        return build_report(sentences, self.sentence_scores(sentences, contexts), self.threshold)


def read_export(model_dir: Path) -> dict:
    """How to run an exported model: ``hallucination.json`` from the export script, or, for an ONNX export
    made elsewhere (optimum, say) of a sequence-classification model, what its ``config.json`` says."""
    from models.export_hallucination_model import META_FILE, support_label_index

    model_dir = Path(model_dir)
    if (model_dir / META_FILE).exists():
        return json.loads((model_dir / META_FILE).read_text())
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir} has neither {META_FILE} nor config.json next to the ONNX file")
    config = json.loads((model_dir / "config.json").read_text())
    id2label = config.get("id2label") or {}
    num_labels = int(config.get("num_labels") or len(id2label) or 2)
    return {
        "kind": "sequence-classification",
        "num_labels": num_labels,
        "support_index": support_label_index(id2label, num_labels),
        "max_length": min(int(config.get("max_position_embeddings") or 512), 512),
        "input_names": None,  # the ONNX file's own inputs
    }


def scorer_from_runner(model_dir: Path, runner: Runner, threshold: float, trust_remote_code: bool = False):
    """A scorer over an exported model directory (tokenizer + hallucination.json) and a runner for its model."""
    from transformers import AutoTokenizer

    meta = read_export(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    input_names = meta.get("input_names") or getattr(runner, "input_names", None)
    if not input_names:
        raise ValueError(f"{model_dir}: the export names no model inputs and the runner has none either")
    max_length = int(meta["max_length"])
    if meta["kind"] == "token-alignment":
        return TokenAlignmentScorer(
            tokenizer, runner, threshold=threshold, max_length=max_length, input_names=input_names
        )
    return PairClassifierScorer(
        tokenizer,
        runner,
        threshold=threshold,
        max_length=max_length,
        input_names=input_names,
        support_index=meta.get("support_index"),
        pair_template=meta.get("pair_template"),
    )


def load_scorer(settings: Settings) -> HallucinationScorer:
    """The configured scorer on an int8 ONNX file (blocking; exports the model on first use).

    ``hallucination_onnx`` names an existing file whose folder holds the tokenizer and either the export
    script's ``hallucination.json`` or the model's ``config.json``; nothing is exported then.
    """
    from models.export_hallucination_model import INT8_FILE, ensure_hallucination_model

    if settings.hallucination_onnx:
        onnx_path = Path(settings.hallucination_onnx).expanduser().resolve()
        if not onnx_path.is_file():
            raise FileNotFoundError(f"hallucination_onnx: no file {onnx_path}")
        model_dir = onnx_path.parent
    else:
        model_dir = ensure_hallucination_model(
            settings.models_dir, settings.hallucination_model, settings.hallucination_trust_remote_code
        )
        onnx_path = model_dir / INT8_FILE
    runner = OnnxRunner(onnx_path, settings.hallucination_threads)
    scorer = scorer_from_runner(
        model_dir, runner, settings.hallucination_threshold, settings.hallucination_trust_remote_code
    )
    log.info("hallucination scorer: %s on %s", scorer.name, onnx_path)
    return scorer
