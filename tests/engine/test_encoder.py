"""The document encoder's batching: length-sorted, padded per batch, and
identical (up to float rounding) to upstream's padded-per-call encoding."""

from __future__ import annotations

import pytest
import torch

from app.engine.encoder import ColBERTEncoder, length_batches, pad_batch
from colbert_patches.model_loading import EncoderOptions


def test_length_batches_cover_every_text_once_within_the_budget():
    lengths = [5, 40, 3, 40, 12, 7, 39, 1, 25, 40, 2]
    rows = [[0] * n for n in lengths]
    batches = length_batches(rows, batch_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(len(rows)))
    for b in batches:
        widths = [lengths[i] for i in b]
        assert widths == sorted(widths)
        assert len(b) == 1 or len(b) * max(widths) <= 80
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)  # batches in ascending length order


def test_a_text_longer_than_the_budget_gets_a_batch_of_its_own():
    batches = length_batches([[0] * 10, [0] * 500], batch_tokens=64)
    assert batches == [[0], [1]]


def test_pad_batch_masks_only_real_tokens():
    ids, mask = pad_batch([[101, 7, 102], [101, 102]], pad_id=0)
    assert ids.tolist() == [[101, 7, 102], [101, 102, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.slow
def test_encoding_matches_upstream_doc_from_text(checkpoint_dir):
    encoder = ColBERTEncoder(str(checkpoint_dir), EncoderOptions.for_checkpoint(str(checkpoint_dir)))
    texts = ["a", "the quick brown fox jumps over the lazy dog " * 12, "short one", "", "mid length text " * 5]
    with torch.inference_mode():
        expected, expected_lens = encoder.checkpoint.docFromText(texts, bsize=2, keep_dims="flatten", to_cpu=True)
    embs, doclens = encoder.encode_documents(texts)
    assert doclens == [int(n) for n in expected_lens]
    assert embs.dtype == torch.float16 and embs.shape == expected.shape
    assert torch.allclose(embs.float(), expected.float(), atol=2e-3)
