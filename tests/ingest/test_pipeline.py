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


def test_each_field_is_split_on_its_own_and_every_chunk_records_its_field():
    summary = "  " + long_text(12, "cat")
    prepared = prepare(DocumentInput("a", long_text(12, "dog"), fields={"summary": summary, "tags": "pets"}))
    by_field: dict[str, list] = {}
    for p in prepared.chunks:
        by_field.setdefault(p.field, []).append(p)
    assert list(by_field) == ["text", "summary", "tags"]  # text first, then the fields in the order given
    assert len(by_field["summary"]) > 1 and [p.text for p in by_field["tags"]] == ["pets"]
    for p in by_field["summary"]:
        assert summary[p.char_start : p.char_end] == p.text and "cat" in p.text
    assert all("dog" in p.text for p in by_field["text"])
    assert prepared.fields == {"summary": summary, "tags": "pets"}


def test_a_title_field_is_the_default_title_and_is_encoded_without_the_prefix():
    fielded = prepare(DocumentInput("a", long_text(40), fields={"title": "  A rather long title of many words  "}))
    assert fielded.title == "A rather long title of many words"
    # It takes its tokens from the other chunks' budget, as the title attribute does.
    plain = prepare(DocumentInput("a", long_text(40), title="A rather long title of many words"))
    assert [p.text for p in fielded.chunks if p.field == "text"] == [p.text for p in plain.chunks]
    (title_chunk,) = [p for p in fielded.chunks if p.field == "title"]
    assert title_chunk.text == "A rather long title of many words"
    assert passage_text(fielded.title, title_chunk.text, "title") == title_chunk.text
    assert passage_text(fielded.title, "body", "summary") == "A rather long title of many words\nbody"
    # The attribute wins over the field for the shown (and prefixed) title.
    both = prepare(DocumentInput("a", "text", title="Shown", fields={"title": "Indexed"}))
    assert both.title == "Shown" and [p.text for p in both.chunks if p.field == "title"] == ["Indexed"]


def test_the_content_hash_covers_the_fields_and_is_unchanged_without_them():
    import hashlib

    plain = prepare(DocumentInput("a", "same text"))
    assert plain.content_hash == hashlib.sha256(b"same text").hexdigest()  # as before fields
    one = prepare(DocumentInput("a", "same text", fields={"x": "1", "y": "2"}))
    reordered = prepare(DocumentInput("a", "same text", fields={"y": "2", "x": "1"}))
    changed = prepare(DocumentInput("a", "same text", fields={"x": "1", "y": "3"}))
    assert one.content_hash == reordered.content_hash
    assert len({plain.content_hash, one.content_hash, changed.content_hash}) == 3
