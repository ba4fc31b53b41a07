"""Query and document tokenizers with switchable augmentation and markers.

Upstream always inserts a marker token ([unused0] for queries, [unused1] for
documents) after [CLS] and always pads queries with [MASK] to
``query_maxlen`` (query augmentation). Both are right for checkpoints trained
that way (colbertv2.0) and measurably wrong for an encoder that never saw them
(the default MiniLM checkpoint; see models/README.md).
"""

from __future__ import annotations

from colbert.modeling.tokenization.doc_tokenization import DocTokenizer
from colbert.modeling.tokenization.query_tokenization import QueryTokenizer
from colbert.modeling.tokenization.utils import (
    _insert_prefix_token,
    _sort_by_length,
    _split_into_batches,
)


class ServerQueryTokenizer(QueryTokenizer):
    def __init__(self, config, options):
        super().__init__(config, verbose=0)
        self.options = options

    def tensorize(self, batch_text, bsize=None, context=None, full_length_search=False):
        if context is not None or full_length_search:
            raise ValueError("context and full_length_search are not supported by the server tokenizer")
        markers = self.options.marker_tokens
        max_length = self.query_maxlen - (1 if markers else 0)
        # Without augmentation, padding only adds zero vectors: pad to the
        # longest query of the batch instead of query_maxlen (a 3-4x cheaper
        # encode for short queries, same scores).
        padding = "max_length" if self.options.query_augmentation else "longest"
        obj = self.tok(list(batch_text), padding=padding, truncation=True, return_tensors="pt", max_length=max_length)
        ids, mask = obj["input_ids"], obj["attention_mask"]
        if markers:
            ids = _insert_prefix_token(ids, self.Q_marker_token_id)
            mask = _insert_prefix_token(mask, 1)
        if self.options.query_augmentation:
            ids[ids == self.pad_token_id] = self.mask_token_id
            if self.config.attend_to_mask_tokens:
                mask[ids == self.mask_token_id] = 1
        # Without augmentation the [PAD] positions stay: ColBERT.query() zeroes
        # their vectors, so they add nothing to MaxSim.
        if bsize:
            return _split_into_batches(ids, mask, bsize)
        return ids, mask


class ServerDocTokenizer(DocTokenizer):
    """``tensorize`` pads a whole call to its longest text (upstream's
    ``docFromText`` needs one width to concatenate its batches);
    :meth:`token_ids` is the unpadded form the server's encoder batches."""

    def __init__(self, config, options):
        super().__init__(config)
        self.options = options

    def tensorize(self, batch_text, bsize=None):
        markers = self.options.marker_tokens
        max_length = self.doc_maxlen - (1 if markers else 0)
        obj = self.tok(
            list(batch_text), padding="longest", truncation="longest_first", return_tensors="pt", max_length=max_length
        )
        ids, mask = obj["input_ids"], obj["attention_mask"]
        if markers:
            ids = _insert_prefix_token(ids, self.D_marker_token_id)
            mask = _insert_prefix_token(mask, 1)
        if bsize:
            ids, mask, reverse_indices = _sort_by_length(ids, mask, bsize)
            return _split_into_batches(ids, mask, bsize), reverse_indices
        return ids, mask

    def token_ids(self, batch_text) -> list[list[int]]:
        """Unpadded input ids per text (truncated, with the marker): the
        encoder pads each length-sorted batch only to its own longest."""
        markers = self.options.marker_tokens
        max_length = self.doc_maxlen - (1 if markers else 0)
        ids = self.tok(list(batch_text), padding=False, truncation="longest_first", max_length=max_length)["input_ids"]
        if markers:
            ids = [row[:1] + [self.D_marker_token_id] + row[1:] for row in ids]
        return ids

    def content_token_budget(self) -> int:
        """Word-pieces of text that fit in one passage ([CLS], marker, [SEP] excluded)."""
        return self.doc_maxlen - 2 - (1 if self.options.marker_tokens else 0)


__all__ = ["ServerQueryTokenizer", "ServerDocTokenizer"]
