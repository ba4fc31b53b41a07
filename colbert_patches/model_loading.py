"""Load a ColBERT checkpoint once, with current transformers, on CPU or GPU.

Fixes:
- upstream ``HF_ColBERT`` calls the deprecated ``init_weights()`` instead of
  ``post_init()``; transformers >= 5 then fails to load any checkpoint
  (``'HF_ColBERT' object has no attribute 'all_tied_weights_keys'``);
- upstream ``Checkpoint`` always turns on CUDA autocast, which warns on every
  call on a CPU-only machine;
- upstream ``Indexer`` and ``Searcher`` each build their own ``Checkpoint``
  (model + two tokenizers): :func:`load_checkpoint` builds one, which the
  engine shares between indexing and search;
- query augmentation ([MASK] padding) and the [Q]/[D] marker tokens are
  switchable per checkpoint (see ``colbert_patches.tokenization``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("colbert_patches")


def _patched_class_factory(original):
    cache: dict[str, type] = {}

    def class_factory(name_or_path):
        if name_or_path in cache:
            return cache[name_or_path]
        base = original(name_or_path)

        # A base known only at run time: mypy cannot check a class built on it.
        class HF_ColBERT(base):  # type: ignore[misc, valid-type]  # noqa: N801 (upstream name, kept for save/load)
            def __init__(self, config, colbert_config):
                super().__init__(config, colbert_config)
                if hasattr(self, "post_init"):
                    self.post_init()

        HF_ColBERT.__qualname__ = "HF_ColBERT"
        cache[name_or_path] = HF_ColBERT
        return HF_ColBERT

    return class_factory


def apply() -> None:
    import colbert.modeling.base_colbert as base_colbert
    import colbert.modeling.hf_colbert as hf_colbert
    import colbert.modeling.tokenization.doc_tokenization as doc_tok
    import colbert.modeling.tokenization.query_tokenization as query_tok

    patched = _patched_class_factory(hf_colbert.class_factory)
    for module in (hf_colbert, base_colbert, doc_tok, query_tok):
        module.class_factory = patched


@dataclass(frozen=True)
class EncoderOptions:
    """How text becomes token vectors for one checkpoint."""

    query_augmentation: bool = True
    marker_tokens: bool = True
    doc_maxlen: int | None = None
    query_maxlen: int | None = None
    # "mean": the transformer's mean-pooled last hidden state is a sentence
    # vector of its own (a sentence-transformers base such as MiniLM), stored
    # per passage as the dense signal; "none": the checkpoint has no such head.
    dense_pooling: str = "none"

    @classmethod
    def for_checkpoint(cls, path_or_name: str, **overrides) -> EncoderOptions:
        """Defaults from the checkpoint's ``colbert_server.json`` (if any)."""
        values: dict = {}
        options_file = Path(path_or_name) / "colbert_server.json"
        if options_file.exists():
            stored = json.loads(options_file.read_text())
            for key in ("query_augmentation", "marker_tokens"):
                if key in stored:
                    values[key] = bool(stored[key])
            if "dense_pooling" in stored:
                values["dense_pooling"] = str(stored["dense_pooling"])
            elif stored.get("base") == "all-MiniLM-L6-v2":  # the default checkpoint, built before the key existed
                values["dense_pooling"] = "mean"
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def load_checkpoint(path_or_name: str, options: EncoderOptions, device: str = "cpu"):
    """Build one ``Checkpoint`` (model + tokenizers) for indexing and search."""
    import warnings

    import torch
    import transformers
    from colbert.infra import ColBERTConfig
    from colbert.modeling.checkpoint import Checkpoint
    from colbert.utils.amp import MixedPrecisionManager

    import colbert_patches

    from .tokenization import ServerDocTokenizer, ServerQueryTokenizer

    colbert_patches.apply()
    transformers.utils.logging.disable_progress_bar()
    extra = {}
    if options.doc_maxlen:
        extra["doc_maxlen"] = options.doc_maxlen
    if options.query_maxlen:
        extra["query_maxlen"] = options.query_maxlen
    config = ColBERTConfig.from_existing(
        ColBERTConfig.load_from_checkpoint(path_or_name), ColBERTConfig(checkpoint=path_or_name, **extra)
    )
    with warnings.catch_warnings():
        # Upstream builds a CUDA GradScaler even on CPU; replaced just below.
        warnings.simplefilter("ignore")
        checkpoint = Checkpoint(path_or_name, colbert_config=config, verbose=0)
    checkpoint.amp_manager = MixedPrecisionManager(device != "cpu" and torch.cuda.is_available())
    checkpoint.query_tokenizer = ServerQueryTokenizer(checkpoint.colbert_config, options)
    checkpoint.doc_tokenizer = ServerDocTokenizer(checkpoint.colbert_config, options)
    if device != "cpu":
        checkpoint = checkpoint.to(device)
    checkpoint.eval()
    return checkpoint
