"""The hallucination scorer: the default int8 token-alignment scorer on a small msmarco-mini check set, int8 vs
fp32 torch, per-sentence reports, edge cases, and the sequence-classification path on a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.answer.hallucination import (
    SUPPORTED,
    UNSUPPORTED,
    PairClassifierScorer,
    TokenAlignmentScorer,
    load_scorer,
    scorer_from_runner,
    split_sentences,
)
from app.answer.runners import OnnxRunner, TorchRunner
from app.settings import Settings
from bench.data import DATA
from bench.hallucination import auroc, build_check_set
from models.export_hallucination_model import (
    DONE_MARKER,
    FP32_FILE,
    INT8_FILE,
    ensure_hallucination_model,
    export_model,
    load_token_encoder_torch,
    support_label_index,
)

pytestmark = pytest.mark.slow

PARIS = (
    "Paris is the capital and most populous city of France. The city hosts the Louvre, "
    "the world's most visited art museum, and the Eiffel Tower, built for the 1889 World's Fair."
)
VOLCANO = "Mount Etna on Sicily is one of the most active volcanoes in the world and erupts almost every year."


def settings_for(tmp_path, models_dir, **overrides) -> Settings:
    return Settings(_env_file=None, environment="test", data_dir=tmp_path, models_dir=models_dir, **overrides)


@pytest.fixture(scope="session")
def models_dir(shared_models_dir):
    """The session's models_dir (conftest), so the answer tests reuse this export."""
    ensure_hallucination_model(shared_models_dir)
    return shared_models_dir


@pytest.fixture(scope="session")
def scorer(models_dir, tmp_path_factory) -> TokenAlignmentScorer:
    loaded = load_scorer(settings_for(tmp_path_factory.mktemp("data"), models_dir, hallucination_threads=2))
    assert isinstance(loaded, TokenAlignmentScorer)
    return loaded


@pytest.fixture(scope="session")
def check_set():
    if not (DATA / "corpus.jsonl").exists():
        pytest.skip(f"msmarco-mini is not at {DATA}")
    return build_check_set(60, seed=11)


@pytest.fixture(scope="session")
def int8_reports(scorer, check_set):
    return [scorer.score(e.answer, e.contexts) for e in check_set]


def test_check_set_is_balanced_and_grounded(check_set):
    assert len(check_set) == 60
    assert sum(e.supported for e in check_set) == 30
    for positive, negative in zip(check_set[::2], check_set[1::2]):
        assert positive.supported and not negative.supported
        assert negative.contexts == positive.contexts
        # A positive is copied from one of its context passages; an unrelated negative from none.
        assert any(split_sentences(positive.answer)[0] in c for c in positive.contexts)
        if negative.kind == "unrelated":
            assert not any(split_sentences(negative.answer)[0] in c for c in negative.contexts)


def test_default_scorer_separates_check_set(int8_reports, check_set):
    labels = [e.supported for e in check_set]
    scores = [r.score for r in int8_reports]
    assert auroc(scores, labels) >= 0.85
    # The default threshold labels most answers right, too.
    correct = [(r.label == SUPPORTED) == e.supported for r, e in zip(int8_reports, check_set)]
    assert np.mean(correct) >= 0.8


def test_int8_scores_within_005_of_fp32_torch(models_dir, int8_reports, check_set):
    import torch

    model_dir = models_dir / "hallucination-minilm-l6"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    reference = scorer_from_runner(model_dir, TorchRunner(load_token_encoder_torch(), names), 0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two torch threads on a busy 2-core machine crawl
    try:  # a third of the set (about 100 passages): enough to see rounding, cheap enough for the suite
        expected_reports = [reference.score(e.answer, e.contexts) for e in check_set[:20]]
    finally:
        torch.set_num_threads(threads)
    for report, expected in zip(int8_reports, expected_reports):
        assert [s.text for s in report.sentences] == [s.text for s in expected.sentences]
        assert abs(report.score - expected.score) <= 0.05
        for got, want in zip(report.sentences, expected.sentences):
            assert abs(got.score - want.score) <= 0.05


def test_auroc_rank_formula():
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [True, False, True, False]) == 0.5
    assert auroc([0.9, 0.3, 0.5, 0.1], [True, True, False, False]) == 0.75


def test_per_sentence_scores_and_labels(scorer):
    answer = "Paris is the capital of France. Mount Etna erupts almost every year on Sicily."
    report = scorer.score(answer, [PARIS])
    assert [s.text for s in report.sentences] == split_sentences(answer)
    first, second = report.sentences
    assert first.label == SUPPORTED and second.label == UNSUPPORTED
    assert first.score > second.score
    assert report.score == min(first.score, second.score)
    assert report.label == UNSUPPORTED and report.threshold == scorer.threshold
    # With the volcano passage in the context both sentences are supported.
    both = scorer.score(answer, [PARIS, VOLCANO])
    assert [s.label for s in both.sentences] == [SUPPORTED, SUPPORTED] and both.label == SUPPORTED
    assert all(0.0 <= s.score <= 1.0 for s in report.sentences + both.sentences)


def test_empty_answer_and_empty_context(scorer):
    for empty in ("", "   \n"):
        report = scorer.score(empty, [PARIS])
        assert report.sentences == [] and report.score == 1.0 and report.label == SUPPORTED
    for contexts in ([], ["", "  "], ["\x00\x01\x02"]):  # the last one tokenizes to nothing
        report = scorer.score("Paris is the capital of France.", contexts)
        assert len(report.sentences) == 1
        assert report.score == 0.0 and report.label == UNSUPPORTED


def test_long_context_is_read_in_windows(scorer):
    filler = " ".join(
        f"Line {i} of the report lists the quarterly sales of the northern branch office." for i in range(40)
    )
    claim = "Mount Etna on Sicily erupts almost every year."
    assert len(scorer.tokenizer(filler)["input_ids"]) > 2 * scorer.max_length
    report = scorer.score(claim, [f"{filler} {VOLCANO}"])
    assert report.label == SUPPORTED
    assert scorer.score(claim, [filler]).label == UNSUPPORTED


def test_stop_words_alone_do_not_make_support(scorer):
    # Only stop words and punctuation match; the claim's content words are elsewhere.
    report = scorer.score("It is one of the most active volcanoes.", ["It is one of the most popular of the cities."])
    assert report.label == UNSUPPORTED


def test_split_sentences_joins_fragments():
    assert split_sentences("Dr. Smith went to Washington in 2010. He liked it there a lot.") == [
        "Dr. Smith went to Washington in 2010.",
        "He liked it there a lot.",
    ]
    assert split_sentences("") == []


def test_export_is_idempotent_and_complete(models_dir):
    target = models_dir / "hallucination-minilm-l6"
    before = (target / INT8_FILE).stat().st_mtime_ns
    assert ensure_hallucination_model(models_dir) == target
    assert (target / INT8_FILE).stat().st_mtime_ns == before
    assert (target / DONE_MARKER).exists() and (target / FP32_FILE).exists()
    # int8 weights: the quantized file is far smaller than the fp32 one.
    assert (target / INT8_FILE).stat().st_size < 0.4 * (target / FP32_FILE).stat().st_size
    meta = json.loads((target / "hallucination.json").read_text())
    assert meta["kind"] == "token-alignment" and meta["opset"] >= 17


def test_onnx_setting_loads_an_existing_file(models_dir, tmp_path, scorer):
    fp32 = models_dir / "hallucination-minilm-l6" / FP32_FILE
    loaded = load_scorer(settings_for(tmp_path, tmp_path / "unused", hallucination_onnx=str(fp32)))
    assert not (tmp_path / "unused").exists()  # nothing exported
    answer = "Paris is the capital of France."
    assert abs(loaded.score(answer, [PARIS]).score - scorer.score(answer, [PARIS]).score) <= 0.05


def test_support_label_index():
    assert support_label_index({0: "contradiction", 1: "entailment", 2: "neutral"}, 3) == 1
    assert support_label_index({0: "ENTAILMENT", 1: "NOT_ENTAILMENT"}, 2) == 0
    assert support_label_index({0: "hallucinated", 1: "consistent"}, 2) == 1
    assert support_label_index({0: "LABEL_0", 1: "LABEL_1"}, 2) == 1
    assert support_label_index({0: "LABEL_0"}, 1) is None
    with pytest.raises(ValueError):
        support_label_index({0: "a", 1: "b", 2: "c"}, 3)


@pytest.fixture(scope="session")
def fake_nli_dir(tmp_path_factory):
    """A tiny, randomly initialised BertForSequenceClassification with NLI labels: a fake for the plumbing only."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from models.build_default_checkpoint import bundled_minilm_dir

    source = bundled_minilm_dir()
    config = BertConfig.from_pretrained(source)
    config.update(
        {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "num_labels": 3,
            "id2label": {0: "contradiction", 1: "entailment", 2: "neutral"},
            "label2id": {"contradiction": 0, "entailment": 1, "neutral": 2},
        }
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fake-tiny-nli") / "fake-tiny-nli"
    BertForSequenceClassification(config).eval().save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return path


def test_sequence_classification_path_with_fake_tiny_model(fake_nli_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    settings = settings_for(tmp_path, tmp_path / "models", hallucination_model=str(fake_nli_dir))
    scorer = load_scorer(settings)
    assert isinstance(scorer, PairClassifierScorer) and scorer.support_index == 1
    export_dir = next((tmp_path / "models").glob("hallucination-*"))
    assert json.loads((export_dir / "hallucination.json").read_text())["kind"] == "sequence-classification"

    answer = "Paris is the capital of France. Mount Etna erupts almost every year."
    contexts = [PARIS, VOLCANO]
    report = scorer.score(answer, contexts)

    # The same pairs through the model in torch: P(entailment), best context per sentence, weakest sentence.
    model = BertForSequenceClassification.from_pretrained(fake_nli_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(fake_nli_dir)
    expected = []
    for sentence in split_sentences(answer):
        batch = tokenizer(contexts, [sentence] * len(contexts), padding=True, return_tensors="pt")
        with torch.no_grad():
            expected.append(float(model(**batch).logits.softmax(-1)[:, 1].max()))
    assert [s.score for s in report.sentences] == pytest.approx(expected, abs=0.05)
    assert report.score == pytest.approx(min(expected), abs=0.05)

    # The fp32 export reproduces torch closely; only int8 rounding is allowed above.
    fp32 = scorer_from_runner(export_dir, OnnxRunner(export_dir / FP32_FILE), 0.5)
    assert [s.score for s in fp32.score(answer, contexts).sentences] == pytest.approx(expected, abs=1e-4)
    assert scorer.score(answer, []).score == 0.0


def test_export_rejects_unreadable_labels(tmp_path, fake_nli_dir):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(fake_nli_dir)
    model.config.id2label = {0: "red", 1: "green", 2: "blue"}
    model.config.label2id = {"red": 0, "green": 1, "blue": 2}
    path = tmp_path / "odd-labels"
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((fake_nli_dir / name).read_bytes())
    with pytest.raises(ValueError):
        export_model(tmp_path / "export", str(path))
    assert not (tmp_path / "export").exists()
