from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from app.ingest.chunking import SentenceChunker
from models.build_default_checkpoint import bundled_minilm_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))


def count(tokenizer, text):
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_short_text_is_one_passage(tokenizer):
    passages = SentenceChunker(tokenizer, 64).split("  Hello there, world.  ")
    assert len(passages) == 1
    p = passages[0]
    assert p.text == "Hello there, world." and "  Hello there, world.  "[p.char_start : p.char_end] == p.text


def test_long_text_sentence_windows_fit_and_cover(tokenizer):
    text = " ".join(f"Sentence {i} has a few words in it." for i in range(300))
    passages = SentenceChunker(tokenizer, 50).split(text)
    assert len(passages) > 10
    for p in passages:
        assert text[p.char_start : p.char_end] == p.text
        assert count(tokenizer, p.text) <= 50
        assert p.text.endswith(".")  # cut between sentences
    assert passages[0].char_start == 0 and passages[-1].char_end == len(text)
    # Nothing lost between passages but whitespace.
    assert all(not text[a.char_end : b.char_start].strip() for a, b in zip(passages, passages[1:]))


def test_text_without_sentence_ends_still_fits(tokenizer):
    text = "word " * 500
    passages = SentenceChunker(tokenizer, 40).split(text)
    assert len(passages) > 5
    assert all(count(tokenizer, p.text) <= 40 for p in passages)


def test_repeated_text_gets_distinct_offsets(tokenizer):
    text = "Install the tools first and check each version twice. " * 60
    passages = SentenceChunker(tokenizer, 60).split(text)
    starts = [p.char_start for p in passages]
    assert starts == sorted(set(starts))
    assert passages[-1].char_end >= len(text.rstrip())
    assert all(text[p.char_start : p.char_end] == p.text for p in passages)


def test_semantic_chunker_splits_at_topic_changes_within_budget(tokenizer):
    from app.ingest.semantic import SemanticChunker

    volcano = " ".join(
        ["Volcanoes erupt molten lava from the mantle.", "Magma chambers build pressure under the crust."] * 6
    )
    cooking = " ".join(["Bake the bread at a high oven temperature.", "Knead the dough until it becomes elastic."] * 6)
    text = f"{volcano} {cooking}"
    passages = SemanticChunker(tokenizer, 60).split(text)
    assert len(passages) >= 2
    for p in passages:
        assert text[p.char_start : p.char_end] == p.text
        assert count(tokenizer, p.text) <= 60
        assert not ("lava" in p.text and "dough" in p.text)  # the topic change is a boundary
