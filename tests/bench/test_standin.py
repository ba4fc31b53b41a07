"""The scale benchmark's stand-in encoder: the real tokenizer, seeded token vectors."""

from __future__ import annotations

import threading

import pytest
import torch

from bench.standin import StandInEncoder, read_stats


@pytest.fixture(scope="module")
def encoder() -> StandInEncoder:
    return StandInEncoder()


TEXTS = [
    "Fahrenheit Scale: Daniel Gabriel Fahrenheit invented the mercury thermometer in 1714.",
    "Banks need to prepare for the next growth curve.",
    "",
]


def test_it_has_the_encoder_interface(encoder):
    assert (encoder.dim, encoder.nbits, encoder.doc_maxlen, encoder.query_maxlen) == (128, 2, 220, 32)
    assert encoder.passage_token_budget == encoder.doc_maxlen - 2
    assert isinstance(encoder.chunk_lock, type(threading.Lock()))
    out = encoder.tokenizer("Hello, world.", add_special_tokens=False, return_offsets_mapping=True)
    assert len(out["input_ids"]) == len(out["offset_mapping"]) == 4
    for name in ("encode_queries", "encode_documents", "maxsim"):
        assert callable(getattr(encoder, name))


def test_document_shapes_and_unit_rows(encoder):
    embs, doclens = encoder.encode_documents(TEXTS)
    assert embs.dtype == torch.float16 and embs.shape == (sum(doclens), 128)
    assert len(doclens) == len(TEXTS) and doclens[2] == 2  # [CLS] [SEP] of an empty text
    norms = embs.float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)
    empty, none = encoder.encode_documents([])
    assert empty.shape == (0, 128) and none == []


def test_documents_drop_punctuation_and_truncate(encoder):
    ids = encoder.tokenizer("a , b . c", add_special_tokens=True)["input_ids"]
    assert encoder.encode_documents(["a , b . c"])[1] == [len(ids) - 2]
    long_text = " ".join(["word"] * 1000)
    assert encoder.encode_documents([long_text])[1] == [encoder.doc_maxlen]


def test_query_shapes_zero_padding_and_unit_rows(encoder):
    Q = encoder.encode_queries(["what is the fahrenheit scale", "banks"])
    lengths = [len(encoder.tokenizer(q)["input_ids"]) for q in ("what is the fahrenheit scale", "banks")]
    assert Q.dtype == torch.float32 and Q.shape == (2, max(lengths), 128)
    norms = Q.norm(dim=-1)
    assert torch.allclose(norms[0], torch.ones(max(lengths)), atol=2e-3)
    assert torch.all(norms[1, lengths[1] :] == 0) and torch.allclose(
        norms[1, : lengths[1]], torch.ones(lengths[1]), atol=2e-3
    )
    assert encoder.encode_queries([" ".join(["word"] * 100)]).shape == (1, encoder.query_maxlen, 128)


def test_deterministic_across_instances_and_batches(encoder):
    other = StandInEncoder()
    a, la = encoder.encode_documents(TEXTS)
    b, lb = other.encode_documents(TEXTS)
    assert la == lb and torch.equal(a, b)
    alone, _ = other.encode_documents(TEXTS[1:2])
    assert torch.equal(alone, a[la[0] : la[0] + la[1]])
    assert torch.equal(encoder.encode_queries(["banks"]), other.encode_queries(["banks"]))
    assert not torch.equal(StandInEncoder(seed=1).encode_documents(TEXTS[:1])[0], a[: la[0]])


def test_without_context_vectors_depend_on_the_token_and_a_little_on_the_position():
    embs, _ = StandInEncoder(context=0.0).encode_documents(["banks banks banks banks banks"])
    rows = embs[1:-1].float()  # the five "banks"
    similarity = rows @ rows.T
    assert similarity.min() > 0.95  # the same token: nearly the same vector
    assert not torch.equal(rows[0], rows[1])  # but not identical at every position
    assert torch.equal(rows[0], rows[4])  # positions 1 and 5 share a variant


def test_context_spreads_a_word_by_its_neighbours(encoder):
    embs, lens = encoder.encode_documents(["the river bank", "the central bank", "a river bank"])
    river, central, again = (e[-2].float() for e in embs.split(lens))  # "bank", before [SEP]
    other = embs.split(lens)[0][1].float()  # "the"
    assert float(river @ again) > 0.95  # same neighbours: nearly the same vector
    assert 0.5 < float(river @ central) < 0.95  # same word, other context: near, not the same
    assert abs(float(river @ other)) < 0.4  # another word: far


def test_maxsim_prefers_overlap(encoder):
    scores = encoder.maxsim("fahrenheit thermometer", TEXTS[:2])
    assert len(scores) == 2 and scores[0] > scores[1]
    assert encoder.maxsim("anything", []) == []


def test_stats_count_document_encoding_per_process(tmp_path):
    encoder = StandInEncoder(stats_dir=tmp_path)
    _, doclens = encoder.encode_documents(TEXTS)
    encoder.maxsim("banks", TEXTS)  # reranking is not indexing
    totals = read_stats(tmp_path)
    assert totals == {"processes": 1, "calls": 1, "passages": len(TEXTS), "tokens": sum(doclens)}
    assert read_stats(tmp_path / "nowhere")["processes"] == 0


def test_the_ingest_pipeline_chunks_with_it(encoder):
    from app.ingest.pipeline import DocumentInput, DocumentPreparer

    text = " ".join(f"Sentence number {i} talks about banks and thermometers." for i in range(120))
    [doc] = DocumentPreparer(encoder).prepare([DocumentInput("d1", text, title="A title")])
    assert len(doc.chunks) > 1
    budget = encoder.passage_token_budget
    assert all(len(encoder.tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= budget for p in doc.chunks)
