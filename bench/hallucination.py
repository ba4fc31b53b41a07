"""The hallucination scorer on a labelled check set built from msmarco-mini.

Check set (seeded): for a judged query, the context is five of its judged
passages, one of them a supporting passage (grade >= 2). The positive answer
is one or two consecutive sentences copied from the supporting passage. The
negative answer, scored against the same context, is either one or two fluent
sentences from a passage judged relevant for another query ("unrelated"), or
a copied sentence followed by such an unrelated sentence ("mixed": one
hallucinated sentence in an otherwise supported answer).

Reports: AUROC (rank formula), the F1-best threshold on a calibration set
(another seed) and the accuracy at it, the alternatives the default method
was chosen from, and the int8 ONNX scorer against the same scorer in fp32
torch (same tokenization, same scoring code): median latency per answer,
the speed ratio, the largest score difference.

    python -m bench.hallucination [--pairs 344] [--seed 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.data import DATA, load, passage_text

CONTEXT_PASSAGES = 5
MIN_WORDS, MAX_WORDS = 6, 60
CALIBRATION_SEED = 1


@dataclass(frozen=True)
class Example:
    answer: str
    contexts: list[str]
    supported: bool
    kind: str  # "copied" | "unrelated" | "mixed"
    query_id: str


@functools.cache
def usable_sentences(text: str) -> tuple[str, ...]:
    from app.answer.hallucination import split_sentences

    return tuple(s for s in split_sentences(text) if MIN_WORDS <= len(s.split()) <= MAX_WORDS)


def build_check_set(pairs: int, seed: int, data_dir: Path = DATA) -> list[Example]:
    """``pairs`` examples, half supported; each negative is scored against its positive's context."""
    corpus, _, qrels = load(data_dir)
    texts = {doc["_id"]: passage_text(doc) for doc in corpus}
    rng = random.Random(seed)
    query_ids = sorted(q for q in qrels if len(qrels[q]) > CONTEXT_PASSAGES)
    relevant = {q: sorted(d for d, g in qrels[q].items() if g >= 2 and d in texts) for q in query_ids}
    examples: list[Example] = []
    round_no = 0
    while len(examples) < pairs:
        rng.shuffle(query_ids)
        for qid in query_ids:
            if len(examples) >= pairs:
                break
            supporting = [d for d in relevant[qid] if len(usable_sentences(texts[d])) >= 2]
            if not supporting:
                continue
            support_id = rng.choice(supporting)
            others = sorted(d for d in qrels[qid] if d != support_id and d in texts)
            context_ids = [support_id, *rng.sample(others, CONTEXT_PASSAGES - 1)]
            rng.shuffle(context_ids)
            contexts = [texts[d] for d in context_ids]

            sentences = usable_sentences(texts[support_id])
            n = rng.choice((1, 2))
            start = rng.randrange(len(sentences) - n + 1)
            copied = " ".join(sentences[start : start + n])

            other_q = rng.choice([q for q in query_ids if q != qid and relevant[q]])
            foreign_ids = [d for d in relevant[other_q] if d not in qrels[qid] and usable_sentences(texts[d])]
            if not foreign_ids:
                continue
            foreign = usable_sentences(texts[rng.choice(foreign_ids)])
            kind = "mixed" if (len(examples) // 2 + round_no) % 3 == 2 else "unrelated"
            if kind == "mixed":
                wrong = f"{rng.choice(sentences)} {rng.choice(foreign)}"
            else:
                m = min(rng.choice((1, 2)), len(foreign))
                first = rng.randrange(len(foreign) - m + 1)
                wrong = " ".join(foreign[first : first + m])
            examples.append(Example(copied, contexts, True, "copied", qid))
            examples.append(Example(wrong, contexts, False, kind, qid))
        round_no += 1
    return examples[:pairs]


def build_same_topic_set(pairs: int, seed: int, data_dir: Path = DATA) -> list[Example]:
    """A harder diagnostic: the negative is a sentence from another passage judged for the *same* query that is
    not in the context. Its label is noisy: msmarco passages for one query often say the same thing, so some of
    these "negatives" are in fact supported by the context."""
    corpus, _, qrels = load(data_dir)
    texts = {doc["_id"]: passage_text(doc) for doc in corpus}
    rng = random.Random(seed)
    examples: list[Example] = []
    for example in build_check_set(pairs, seed, data_dir)[::2]:
        context = set(example.contexts)
        candidates = sorted(d for d in qrels[example.query_id] if texts.get(d) and texts[d] not in context)
        sentences = [s for d in candidates for s in usable_sentences(texts[d]) if not any(s in c for c in context)]
        if sentences:
            examples += [
                example,
                Example(rng.choice(sentences), example.contexts, False, "same-topic", example.query_id),
            ]
    return examples


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve by the rank (Mann-Whitney) formula, ties counted half."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    positives, negatives = labels.sum(), (~labels).sum()
    if not positives or not negatives:
        raise ValueError("AUROC needs both classes")
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def best_f1_thresholds(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, float]:
    """The lowest and highest threshold (midpoints between neighbouring scores) with the best F1 for the
    supported class."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1e-9], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-9]])
    f1 = []
    for t in candidates:
        predicted = scores >= t
        tp = (predicted & labels).sum()
        f1.append(2 * tp / (predicted.sum() + labels.sum()) if tp else 0.0)
    best = np.flatnonzero(np.isclose(f1, max(f1)))
    return float(candidates[best[0]]), float(candidates[best[-1]])


def accuracy(scores: Sequence[float], labels: Sequence[bool], threshold: float) -> float:
    return float(np.mean((np.asarray(scores) >= threshold) == np.asarray(labels, dtype=bool)))


# Sentence and answer aggregations measured against each other (the scorer uses mean + min).
SENTENCE_AGGREGATES: dict[str, Callable[[np.ndarray], float]] = {
    "mean best cosine": lambda s: float(s.mean()) if s.size else 0.0,
    "share of tokens >= 0.8": lambda s: float((s >= 0.8).mean()) if s.size else 0.0,
    "soft share (logistic at 0.75, width 0.05)": lambda s: (
        float((1 / (1 + np.exp(-(s - 0.75) / 0.05))).mean()) if s.size else 0.0
    ),
    "min best cosine": lambda s: float(s.min()) if s.size else 0.0,
}


def answer_aggregates(values: list[float], lengths: list[int]) -> dict[str, float]:
    return {
        "min": min(values),
        "length-weighted mean": float(np.average(values, weights=lengths)),
    }


def alignment_features(scorer, examples: list[Example]) -> list[tuple[list[np.ndarray], list[int]]]:
    """Per example: the per-token support of each sentence and the sentence lengths in content tokens."""
    from app.answer.hallucination import split_sentences

    features = []
    for ex in examples:
        sentences = split_sentences(ex.answer)
        support = scorer.token_support(sentences, ex.contexts)
        features.append((support, [max(1, s.size) for s in support]))
    return features


def compare_alternatives(features, labels) -> list[tuple[str, str, float]]:
    rows = []
    for sentence_name, aggregate in SENTENCE_AGGREGATES.items():
        per_answer: dict[str, list[float]] = {}
        for support, lengths in features:
            values = [aggregate(s) for s in support]
            for name, value in answer_aggregates(values, lengths).items():
                per_answer.setdefault(name, []).append(value)
        for answer_name, scores in per_answer.items():
            rows.append((sentence_name, answer_name, auroc(scores, labels)))
    return rows


def time_scorers(scorers: dict, examples: list[Example], warmup: int = 3):
    """Per-answer wall and thread-CPU seconds and the sentence + overall scores of each scorer.

    The scorers take turns on each answer, so load from other processes on a shared machine falls on all of
    them alike. With one intra-op thread the model runs on the calling thread, so its CPU time is the work
    done, whatever else the machine runs.
    """
    for scorer in scorers.values():
        for ex in examples[:warmup]:
            scorer.score(ex.answer, ex.contexts)
    wall = {name: [] for name in scorers}
    cpu = {name: [] for name in scorers}
    scores = {name: [] for name in scorers}
    for ex in examples:
        for name, scorer in scorers.items():
            start_wall, start_cpu = time.perf_counter(), time.thread_time()
            report = scorer.score(ex.answer, ex.contexts)
            cpu[name].append(time.thread_time() - start_cpu)
            wall[name].append(time.perf_counter() - start_wall)
            scores[name].append([s.score for s in report.sentences] + [report.score])
    return wall, cpu, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=344, help="examples in the check set (half supported)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and onnxruntime alike")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="an export to reuse (default: export to a temp dir)"
    )
    args = parser.parse_args()

    import torch

    from app.answer.hallucination import (
        ALIGNMENT_HIGH,
        ALIGNMENT_LOW,
        TokenAlignmentScorer,
        read_export,
        scorer_from_runner,
    )
    from app.answer.runners import OnnxRunner, TorchRunner
    from app.settings import Settings
    from models.export_hallucination_model import (
        FP32_FILE,
        INT8_FILE,
        export_model,
        load_token_encoder_torch,
    )

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            start = time.perf_counter()
            model_dir = export_model(Path(tmp) / "export")
            print(f"export (fp32 + int8): {time.perf_counter() - start:.1f} s")
        meta = read_export(model_dir)
        names = meta["input_names"]
        threshold_default = Settings.model_fields["hallucination_threshold"].default
        int8 = scorer_from_runner(model_dir, OnnxRunner(model_dir / INT8_FILE, args.threads), threshold_default)
        onnx32 = scorer_from_runner(model_dir, OnnxRunner(model_dir / FP32_FILE, args.threads), threshold_default)
        torch32 = scorer_from_runner(model_dir, TorchRunner(load_token_encoder_torch(), names), threshold_default)
        assert isinstance(int8, TokenAlignmentScorer)

        calibration = build_check_set(args.pairs, CALIBRATION_SEED)
        examples = build_check_set(args.pairs, args.seed)
        cal_labels = [e.supported for e in calibration]
        labels = [e.supported for e in examples]
        kinds = {k: sum(e.kind == k for e in examples) for k in ("copied", "unrelated", "mixed")}
        print(
            f"check set: {len(examples)} answers (seed {args.seed}): {kinds}; calibration set: seed {CALIBRATION_SEED}"
        )

        # Alternatives, on the int8 scorer's token support (AUROC is unchanged by a monotone calibration).
        features = alignment_features(int8, examples)
        print("\nAUROC of the alternatives (sentence aggregate x answer aggregate):")
        for sentence_name, answer_name, value in compare_alternatives(features, labels):
            print(f"  {sentence_name:45s} {answer_name:22s} {value:.3f}")

        # Calibration constants: the median mean best cosine of the calibration set's copied sentences and
        # of its unrelated ones (the scorer maps them to 1 and 0).
        cal_features = alignment_features(int8, calibration)
        copied, unrelated = [], []
        for ex, (support, _) in zip(calibration, cal_features):
            means = [float(s.mean()) for s in support if s.size]
            if ex.kind == "copied":
                copied += means
            elif ex.kind == "unrelated":
                unrelated += means
        print(
            f"\ncalibration set: median mean best cosine, copied sentences {statistics.median(copied):.3f}, "
            f"unrelated {statistics.median(unrelated):.3f} (scorer constants: {ALIGNMENT_HIGH} and {ALIGNMENT_LOW})"
        )
        cal_scores = [
            min((int8.calibrate(float(x.mean())) if x.size else 0.0 for x in support), default=1.0)
            for support, _ in cal_features
        ]
        low, high = best_f1_thresholds(cal_scores, cal_labels)
        threshold = (low + high) / 2
        print(f"F1-best thresholds on the calibration set: {low:.3f} to {high:.3f} (middle {threshold:.3f})")

        scorers = {"fp32 torch": torch32, "fp32 ONNX": onnx32, "int8 ONNX": int8}
        wall, cpu, scores = time_scorers(scorers, examples)
        overall = [s[-1] for s in scores["int8 ONNX"]]
        print(f"\nAUROC, default scorer (int8 ONNX), overall score: {auroc(overall, labels):.3f}")
        for kind in ("unrelated", "mixed"):
            subset = [i for i, e in enumerate(examples) if e.kind in ("copied", kind)]
            print(f"  copied vs {kind}: {auroc([overall[i] for i in subset], [labels[i] for i in subset]):.3f}")
        print(f"  same scorer in fp32 torch: {auroc([s[-1] for s in scores['fp32 torch']], labels):.3f}")
        for t in sorted({threshold_default, round(threshold, 2)}):
            print(f"accuracy at threshold {t:.2f}: {accuracy(overall, labels, t):.3f}")
        same_topic = build_same_topic_set(120, args.seed)
        same_scores = [int8.score(e.answer, e.contexts).score for e in same_topic]
        print(
            f"diagnostic, copied vs a sentence from a same-query passage outside the context ({len(same_topic)} answers,"
            f" noisy labels): AUROC {auroc(same_scores, [e.supported for e in same_topic]):.3f}"
        )

        sentences = sum(len(s) - 1 for s in scores["int8 ONNX"])
        print(f"\nper answer, {args.threads} intra-op thread(s), {len(examples)} answers, {sentences} sentences:")
        for name in scorers:
            print(
                f"  {name:10s} median wall {1000 * statistics.median(wall[name]):7.1f} ms (total {sum(wall[name]):6.1f} s),"
                f" median thread CPU {1000 * statistics.median(cpu[name]):7.1f} ms"
            )
        for label, times in (("wall", wall), ("thread CPU", cpu)):
            ratio = statistics.median(times["fp32 torch"]) / statistics.median(times["int8 ONNX"])
            print(f"speed ratio int8 ONNX / fp32 torch, median {label}: {ratio:.2f}x")

        def diff(a, b):
            return max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y))

        print(
            f"max |score difference| int8 ONNX vs fp32 torch (sentences and overall): {diff(scores['int8 ONNX'], scores['fp32 torch']):.4f}"
        )
        print(f"max |score difference| fp32 ONNX vs fp32 torch: {diff(scores['fp32 ONNX'], scores['fp32 torch']):.5f}")


if __name__ == "__main__":
    main()
