"""The rerank stage (app/engine/rerank.py) on tiny randomly initialised models
built here: a 2-layer BERT cross-encoder and a 2-layer Llama causal LM, both
on the bundled MiniLM tokenizer (whose vocabulary has "yes" and "no").

The search tests run the real app over the fake encoder and the in-memory
fake backend (retrieval is not what they test); the last one, marked slow,
runs the real ColBERT checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from app.engine.rerank import (
    LLM_INSTRUCTION,
    LLM_PREFIX,
    LLM_SUFFIX,
    CrossEncoderReranker,
    LLMReranker,
    detect_kind,
    load_reranker,
)
from app.service import SearchService
from app.settings import Settings
from models.build_default_checkpoint import bundled_minilm_dir
from tests.conftest import RunningApp, make_settings
from tests.fakes import FakeEncoder, FakeInMemoryBackend
from tests.test_service import fake_app

QUERY = "where do blue whales live"
PASSAGES = [
    "Blue whales live in every ocean except the Arctic.",
    "The quick red fox jumps over the lazy dog near the barn at dawn, then runs into the forest.",
    "Whales.",
    "A crab walks sideways on the ocean floor, looking for food among the rocks and the sea grass.",
    "Trains leave the station every hour.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(bundled_minilm_dir())


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny BERT cross-encoder with one logit (as ms-marco MiniLM has)."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    return _save(BertForSequenceClassification(config), tokenizer, tmp_path_factory.mktemp("cross-encoder"))


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama causal LM over the same vocabulary."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=None,
    )
    return _save(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("llm"))


def settings_for(tmp_path: Path, reranker: str | Path, **overrides) -> Settings:
    return Settings(
        _env_file=None,
        environment="test",
        data_dir=tmp_path,
        log_level="WARNING",
        answer_preload=False,
        reranker=str(reranker),
        **overrides,
    )


# -- loading -------------------------------------------------------------


def test_kind_is_told_from_the_model_config(tmp_path, cross_encoder_dir, llm_dir, tokenizer):
    assert isinstance(load_reranker(settings_for(tmp_path, cross_encoder_dir)), CrossEncoderReranker)
    assert isinstance(load_reranker(settings_for(tmp_path, llm_dir)), LLMReranker)
    assert detect_kind(BertConfig(architectures=["BertForSequenceClassification"])) == "cross-encoder"
    assert detect_kind(LlamaConfig(architectures=["Qwen3ForCausalLM"])) == "llm"
    assert detect_kind(BertConfig(), gguf=True) == "llm"
    # A bare encoder is neither: auto refuses and names the setting to use.
    bare = _save(
        BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)), tokenizer, tmp_path / "bare"
    )
    with pytest.raises(ValueError, match="set reranker_kind"):
        load_reranker(settings_for(tmp_path, bare))


def test_reranker_kind_setting_overrides_auto(tmp_path, llm_dir):
    # A causal LM's checkpoint read as a sequence classifier: transformers
    # gives it a fresh head; the setting decides, not the config.
    reranker = load_reranker(settings_for(tmp_path, llm_dir, reranker_kind="cross-encoder"))
    assert isinstance(reranker, CrossEncoderReranker)


def test_no_reranker_by_default(tmp_path):
    settings = Settings(_env_file=None, data_dir=tmp_path)
    assert settings.reranker == "" and load_reranker(settings) is None


def test_a_missing_path_is_a_clear_error(tmp_path):
    for missing in (tmp_path / "no-such-model", "./no-such-model", "~/no-such-model.gguf"):
        with pytest.raises(FileNotFoundError, match="reranker: no file or directory"):
            load_reranker(settings_for(tmp_path, missing))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="neither a model directory nor a .gguf file"):
        load_reranker(settings_for(tmp_path, tmp_path / "weights.bin"))


async def test_the_service_fails_to_start_on_a_missing_reranker(tmp_path):
    settings = settings_for(tmp_path / "data", tmp_path / "no-such-model")
    service = SearchService(settings, encoder=FakeEncoder(), backend_factory=lambda s, e: FakeInMemoryBackend())
    try:
        with pytest.raises(FileNotFoundError, match="reranker: no file or directory"):
            await service.astart()
        assert not service.ready
    finally:
        await service.astop()


async def test_the_app_stays_unready_on_a_missing_reranker(tmp_path):
    async with fake_app(tmp_path, ready=False, reranker=str(tmp_path / "no-such-model")) as (app, _, client):
        await asyncio.wait([app.state.startup])  # the start-up task ends, with the error
        assert isinstance(app.state.startup.exception(), FileNotFoundError)
        assert (await client.get("/ready")).status_code == 503


# -- scores --------------------------------------------------------------


def test_cross_encoder_scores_are_the_logit_of_each_pair(tmp_path, cross_encoder_dir):
    reranker = load_reranker(settings_for(tmp_path, cross_encoder_dir, reranker_batch_size=2))
    scores = reranker.score(QUERY, PASSAGES)
    assert scores == reranker.score(QUERY, PASSAGES)  # deterministic, whatever the batch
    assert len(set(scores)) == len(PASSAGES)
    # Each pair alone, unpadded, straight through the model.
    with torch.inference_mode():
        for passage, score in zip(PASSAGES, scores):
            alone = reranker.tokenizer(QUERY, passage, return_tensors="pt")
            assert score == pytest.approx(float(reranker.model(**alone).logits[0, 0]), abs=1e-5)


def test_a_two_class_cross_encoder_scores_the_relevant_class(tmp_path, tokenizer):
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label={0: "relevant", 1: "irrelevant"},
        label2id={"relevant": 0, "irrelevant": 1},
    )
    path = _save(BertForSequenceClassification(config), tokenizer, tmp_path / "two-class")
    reranker = load_reranker(settings_for(tmp_path, path))
    assert reranker.label == 0
    with torch.inference_mode():
        alone = reranker.tokenizer(QUERY, PASSAGES[0], return_tensors="pt")
        expected = float(reranker.model(**alone).logits[0, 0])
    assert reranker.score(QUERY, PASSAGES[:1])[0] == pytest.approx(expected, abs=1e-5)


def test_llm_scores_are_the_probability_of_yes(tmp_path, llm_dir):
    reranker = load_reranker(settings_for(tmp_path, llm_dir, reranker_batch_size=3))
    scores = reranker.score(QUERY, PASSAGES)
    assert scores == reranker.score(QUERY, PASSAGES)
    assert all(0.0 < s < 1.0 for s in scores) and len(set(scores)) == len(PASSAGES)
    tok = reranker.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    with torch.inference_mode():
        # Padded batches (rows of different lengths) must score as each prompt alone.
        for passage, score in zip(PASSAGES, scores):
            prompt = f"{LLM_PREFIX}<Instruct>: {LLM_INSTRUCTION}\n<Query>: {QUERY}\n<Document>: {passage}{LLM_SUFFIX}"
            ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
            logits = reranker.model(ids).logits[0, -1]
            p_yes = torch.exp(logits[yes]) / (torch.exp(logits[yes]) + torch.exp(logits[no]))
            assert score == pytest.approx(float(p_yes), abs=1e-5)


def test_long_passages_are_cut_to_max_length(tmp_path, cross_encoder_dir, llm_dir):
    long_passage = " ".join(["whale"] * 3000)
    for path in (cross_encoder_dir, llm_dir):
        reranker = load_reranker(settings_for(tmp_path, path, reranker_max_length=128))
        rows = reranker._rows(QUERY, [long_passage, "short"])
        assert max(len(r["input_ids"]) for r in rows) == 128
        assert len(reranker.score(QUERY, [long_passage, "short"])) == 2
    llm = load_reranker(settings_for(tmp_path, llm_dir, reranker_max_length=128))
    assert llm._rows(QUERY, [long_passage])[0]["input_ids"][-len(llm.suffix) :] == llm.suffix  # the question stays
    with pytest.raises(ValueError, match="reranker_max_length 40 leaves"):
        load_reranker(settings_for(tmp_path, llm_dir, reranker_max_length=40))


# -- search --------------------------------------------------------------

DOCS = [
    {"id": "whale", "text": "Blue whales live in every ocean except the Arctic."},
    {"id": "whale-song", "text": "The blue whale sings in the ocean.", "title": "Songs"},
    {"id": "crab", "text": "A crab walks sideways on the ocean floor."},
    {"id": "fox", "text": "The quick red fox jumps over the lazy dog."},
    {"id": "ocean", "text": "The ocean covers most of the planet; whales and crabs live there."},
    {"id": "train", "text": "Trains leave the station every hour."},
    {"id": "lake", "text": "A blue lake in the mountains."},
    {"id": "bread", "text": "Bread rises in a warm oven."},
]


async def _search(client, **body) -> dict:
    r = await client.post("/v1/collections/docs/search", json={"query": "blue whale ocean", **body})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("kind", ["cross-encoder", "llm"])
async def test_search_orders_the_top_candidates_by_the_reranker(tmp_path, cross_encoder_dir, llm_dir, kind):
    path = cross_encoder_dir if kind == "cross-encoder" else llm_dir
    async with fake_app(tmp_path, reranker=str(path), rerank_depth=6) as (_, service, client):
        await client.post("/v1/collections", json={"name": "docs"})
        r = await client.post("/v1/collections/docs/documents", json={"documents": DOCS, "wait": True})
        assert r.status_code == 200, r.text

        retrieved = await _search(client, k=6, rerank=False)
        assert retrieved["reranked"] is False
        candidates = retrieved["results"]
        texts = [f"{h['title']}\n{h['text']}" if h["title"] else h["text"] for h in candidates]
        expected = service.reranker.score("blue whale ocean", texts)
        by_reranker = sorted(zip(candidates, expected), key=lambda item: -item[1])

        for body in ({}, {"rerank": True}, {"mode": "hybrid"}):
            reranked = await _search(client, k=3, **body)
            assert reranked["reranked"] is True
            hits = reranked["results"]
            assert len(hits) == 3 and [h["rank"] for h in hits] == [1, 2, 3]
            if body.get("mode") == "hybrid":  # other candidates; still ordered by the reranker's score
                assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
                continue
            # The top 3 of the 6 retrieved by the reranker's score, which the hits carry.
            assert [h["document_id"] for h in hits] == [c["document_id"] for c, _ in by_reranker[:3]]
            assert [h["score"] for h in hits] == pytest.approx([s for _, s in by_reranker[:3]], abs=1e-5)
        # The tiny random model disagrees with retrieval: the stage did reorder.
        assert [c["document_id"] for c, _ in by_reranker[:3]] != [c["document_id"] for c in candidates[:3]]


async def test_rerank_false_keeps_retrieval_order_and_scores(tmp_path, cross_encoder_dir):
    async with fake_app(tmp_path, reranker=str(cross_encoder_dir), rerank_depth=6) as (_, service, client):
        await client.post("/v1/collections", json={"name": "docs"})
        await client.post("/v1/collections/docs/documents", json={"documents": DOCS, "wait": True})
        hits = (await _search(client, k=4, rerank=False))["results"]
        assert len(hits) == 4
        texts = [f"{h['title']}\n{h['text']}" if h["title"] else h["text"] for h in hits]
        # The fake encoder's MaxSim, best first, as without a reranker.
        maxsim = service.encoder.maxsim("blue whale ocean", texts)
        assert [h["score"] for h in hits] == pytest.approx(maxsim, abs=1e-2)  # fp16 token vectors
        assert maxsim == sorted(maxsim, reverse=True)
    async with fake_app(tmp_path / "plain") as (_, service, client):
        assert service.reranker is None
        await client.post("/v1/collections", json={"name": "docs"})
        await client.post("/v1/collections/docs/documents", json={"documents": DOCS, "wait": True})
        plain = await _search(client, k=4)
        assert plain["reranked"] is False
        assert [h["document_id"] for h in plain["results"]] == [h["document_id"] for h in hits]


async def test_a_bad_rerank_value_is_refused(tmp_path):
    async with fake_app(tmp_path) as (_, _, client):
        await client.post("/v1/collections", json={"name": "docs"})
        r = await client.post("/v1/collections/docs/search", json={"query": "x", "rerank": "yes"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
        assert (await _search(client, rerank=True))["reranked"] is False  # asked for, none configured


@pytest.mark.slow
async def test_search_with_the_real_checkpoint_and_a_reranker(tmp_path, checkpoint_dir, cross_encoder_dir):
    running = RunningApp(make_settings(tmp_path, checkpoint_dir, reranker=str(cross_encoder_dir), rerank_depth=5))
    client = await running.start()
    try:
        await client.post("/v1/collections", json={"name": "docs"})
        r = await client.post("/v1/collections/docs/documents", json={"documents": DOCS, "wait": True})
        assert r.status_code == 200, r.text
        candidates = (await _search(client, k=5, rerank=False))["results"]
        hits = (await _search(client, k=2))["results"]
        reranker = running.app.state.service.reranker
        texts = [f"{h['title']}\n{h['text']}" if h["title"] else h["text"] for h in candidates]
        scores = reranker.score("blue whale ocean", texts)
        best = sorted(zip(candidates, scores), key=lambda item: -item[1])[:2]
        assert [h["document_id"] for h in hits] == [c["document_id"] for c, _ in best]
        assert [h["score"] for h in hits] == pytest.approx([s for _, s in best], abs=1e-5)
        # The reference server's format goes through the same stage.
        topk = await client.get("/api/search", params={"query": "blue whale ocean", "k": 2, "collection": "docs"})
        assert [t["document_id"] for t in topk.json()["topk"]] == [c["document_id"] for c, _ in best]
    finally:
        await running.stop()
