from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from app.ingest.chunking import split_by_tokens
from models.build_default_checkpoint import bundled_minilm_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(bundled_minilm_dir()))


def test_short_text_is_one_passage(tokenizer):
    passages = split_by_tokens("  Hello there, world.  ", tokenizer, budget=64)
    assert len(passages) == 1
    p = passages[0]
    assert p.text == "Hello there, world." and "  Hello there, world.  "[p.char_start : p.char_end] == p.text


def test_long_text_windows_fit_and_cover(tokenizer):
    text = " ".join(f"Sentence {i} has a few words in it." for i in range(300))
    passages = split_by_tokens(text, tokenizer, budget=50)
    assert len(passages) > 10
    for p in passages:
        assert text[p.char_start : p.char_end] == p.text
        assert len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 50
    assert passages[0].char_start == 0 and passages[-1].char_end == len(text)
    assert all(b.char_start <= a.char_end for a, b in zip(passages, passages[1:]))  # no gaps
    assert sum(p.text.endswith(".") for p in passages) >= len(passages) - 1  # cut at sentence ends


def test_text_without_sentence_ends(tokenizer):
    text = "word " * 500
    passages = split_by_tokens(text, tokenizer, budget=40)
    assert all(len(tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 40 for p in passages)
