"""Documents to chunk rows: offsets, sections, title budget (fake encoder's
word tokenizer; the real tokenizer's chunking is in test_chunking.py)."""

from __future__ import annotations

from app.ingest.extract import Section
from app.ingest.pipeline import DocumentInput, DocumentPreparer, passage_text
from tests.fakes import FakeEncoder


def prepare(doc: DocumentInput):
    return DocumentPreparer(FakeEncoder()).prepare([doc])[0]


def long_text(n: int, word: str = "word") -> str:
    return " ".join(f"Sentence {i} has a {word} in it." for i in range(n))


def test_every_chunk_points_at_its_own_text():
    text = "  " + long_text(60) + "\n"
    prepared = prepare(DocumentInput("a", text))
    assert len(prepared.chunks) > 3
    for p in prepared.chunks:
        assert text[p.char_start : p.char_end] == p.text
        assert len(FakeEncoder().tokenizer(p.text)["input_ids"]) <= FakeEncoder.passage_token_budget
    starts = [p.char_start for p in prepared.chunks]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert prepared.chunks[-1].char_end == len(text.rstrip())


def test_sections_split_separately_and_carry_page_and_heading():
    first, second = long_text(12, "cat"), long_text(12, "dog")
    text = first + "\n\n" + second
    sections = [Section(0, len(first), page=1, heading="Cats"), Section(len(first) + 2, len(text), 2, "Dogs")]
    prepared = prepare(DocumentInput("a", text, sections=sections))
    assert {(p.page, p.heading) for p in prepared.chunks} == {(1, "Cats"), (2, "Dogs")}
    for p in prepared.chunks:
        assert text[p.char_start : p.char_end] == p.text
        assert ("cat" in p.text) == (p.page == 1)


def test_a_title_takes_its_tokens_from_each_chunk_budget():
    text = long_text(40)
    plain = prepare(DocumentInput("a", text))
    titled = prepare(DocumentInput("a", text, title="  A rather long title of many words indeed  "))
    assert titled.title == "A rather long title of many words indeed"
    assert len(titled.chunks) > len(plain.chunks)
    tokens = FakeEncoder().tokenizer
    for p in titled.chunks:
        assert len(tokens(passage_text(titled.title, p.text))["input_ids"]) <= FakeEncoder.passage_token_budget + 1


def test_content_hash_and_metadata():
    a = prepare(DocumentInput("a", "same text", metadata={"k": 1}))
    b = prepare(DocumentInput("b", "same text"))
    assert a.content_hash == b.content_hash and a.metadata == {"k": 1} and b.metadata == {}


def test_token_counts_match_the_tokenizer_whatever_its_last_call_set():
    """The preparer counts with its own copy of the Rust tokenizer: the same
    counts as the HF call, even after a call that truncated or padded."""
    import threading

    from transformers import AutoTokenizer

    from models.build_default_checkpoint import bundled_minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))

    class RealTokenizerEncoder:  # the preparer's view of an encoder, with the bundled tokenizer
        chunk_lock = threading.Lock()
        passage_token_budget = 32

    RealTokenizerEncoder.tokenizer = tokenizer
    texts = ["granite quarry", "A longer text, with punctuation; and numbers 1,234.5!" * 20, "", "naïve café"]
    expected = [len(r) for r in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    tokenizer(texts, truncation=True, max_length=8, padding="max_length")  # leaves its settings behind
    assert DocumentPreparer(RealTokenizerEncoder())._counts(texts) == expected
    assert max(expected) > 8
