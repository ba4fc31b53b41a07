"""The ColBERT encoder shared by indexing and search in one process."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import colbert_patches
from colbert_patches.model_loading import EncoderOptions, load_checkpoint

logger = logging.getLogger("app.engine")

# Token positions per document-encoding batch (padding included). On a CPU
# smaller batches keep the activations in cache: on 1,000 scale-corpus
# passages (2 cores, torch, ``python -m bench.encoder_batches``), 2,048
# positions encoded 119.7 passages/s in one call against 110.7 at 4,096 and
# 98.7 at 8,192 (1,024: 114.5). A GPU wants large ones.
BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into length-sorted batches whose padded
    size (rows x longest row) stays within ``batch_tokens``: short texts are
    not padded to the length of long ones."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[i]  # the longest so far: the order is ascending
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), right-padded to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[n, : len(row)] = 1
    return ids, mask


RUNTIMES = ("torch", "onnx", "onnx-int8")
QUERY_STATE_ROWS = 256  # queries per forward in ``token_states``


class OnnxDocumentModel:
    """The checkpoint's transformer on onnxruntime (an export by
    ``models/export_colbert_onnx.py``): its last hidden states, which the
    encoder projects, masks and pools as it does torch's."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (b, L, hidden) float32."""
        out = self.session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        return torch.from_numpy(out)


@dataclass
class EncodedPassages:
    """What one forward pass gives for a list of passages."""

    embs: torch.Tensor  # packed token vectors (sum(doclens), dim) float16, L2-normalised rows
    doclens: list[int]
    dense: torch.Tensor | None  # (n, dense_dim) float16, L2-normalised; None: the checkpoint has no pooled head


@dataclass
class TokenStates:
    """Hidden states of each text, as tuning reads them (``app/tune.py``).

    Without ``layer``: the transformer's last hidden states at the positions
    its token vectors come from (what the linear layer reads); ``attention``
    and ``kept`` are None. With ``layer``: the states entering that layer at
    every position of the text, which the layers from there on attend over
    (``attention``), and which positions give token vectors (``kept``)."""

    states: list[torch.Tensor]  # per text: (positions, hidden) float16
    dense: torch.Tensor | None  # (n, hidden) float16, the pooled vector of the same forward; None: none or ``layer``
    attention: list[torch.Tensor] | None = None  # per text: (positions,) bool
    kept: list[torch.Tensor] | None = None  # per text: (positions,) bool


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean of the hidden states over the attended positions
    (sentence-transformers' mean pooling)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)


class ColBERTEncoder:
    """One checkpoint (model + tokenizers), loaded once, used by every thread.

    ``runtime`` chooses what runs the document forward: ``torch`` (on a CUDA
    GPU when ``device`` says so), or onnxruntime on an export of the same
    weights, ``onnx`` (fp32, the same vectors) or ``onnx-int8`` (dynamic int8,
    about 2.5x faster on a CPU, vectors within a few hundredths: see
    BENCHMARKS.md for what that costs in retrieval). Queries always run on
    torch (one short forward per search)."""

    def __init__(
        self,
        checkpoint: str,
        options: EncoderOptions,
        runtime: str = "torch",
        models_dir: Path | None = None,
        device: str = "cpu",
    ):
        colbert_patches.apply()
        started = time.perf_counter()
        self.checkpoint_name = checkpoint
        self.options = options
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown encoder runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
        self.checkpoint = load_checkpoint(checkpoint, options, device=device)
        self.runtime = runtime
        self.batch_tokens = GPU_BATCH_TOKENS if device != "cpu" and runtime == "torch" else BATCH_TOKENS
        config = self.checkpoint.colbert_config
        self.dim = int(config.dim)
        self.nbits = int(config.nbits) if config.nbits in (1, 2, 4, 8) else 2
        self.doc_maxlen = int(config.doc_maxlen)
        self.query_maxlen = int(config.query_maxlen)
        # Fast tokenizers refuse concurrent use of one instance ("Already
        # borrowed"); queries and documents have their own instance and lock.
        self._query_lock = threading.Lock()
        self._doc_lock = threading.Lock()
        self.chunk_lock = threading.Lock()
        self._chunk_tokenizer = copy.deepcopy(self.checkpoint.doc_tokenizer.tok)
        self._pad_id = int(self.checkpoint.doc_tokenizer.tok.pad_token_id or 0)
        self.device = device
        model = self.checkpoint
        self._skiplist = torch.tensor([k for k in getattr(model, "skiplist", {}) if isinstance(k, int)] or [-1])
        # The pooled sentence vector of the same forward pass (the dense
        # signal): only for a checkpoint whose base was trained for it.
        if options.dense_pooling not in ("mean", "none"):
            raise ValueError(f"unknown dense pooling {options.dense_pooling!r}: use mean or none")
        self.dense_dim: int | None = int(model.bert.config.hidden_size) if options.dense_pooling == "mean" else None
        self._onnx: OnnxDocumentModel | None = None
        if runtime != "torch":
            from models.export_colbert_onnx import FP32_FILE, INT8_FILE, ensure_colbert_onnx

            if models_dir is None:
                raise ValueError("an onnx encoder runtime needs a models directory for its export")
            export = ensure_colbert_onnx(models_dir, self.checkpoint, checkpoint)
            path = export / (INT8_FILE if runtime == "onnx-int8" else FP32_FILE)
            self._onnx = OnnxDocumentModel(path, torch.get_num_threads())
        logger.info(
            "loaded checkpoint %s (dim=%d, dense=%s, doc_maxlen=%d, augmentation=%s, markers=%s, documents on %s)"
            " in %.1fs",
            checkpoint,
            self.dim,
            self.dense_dim or "none",
            self.doc_maxlen,
            options.query_augmentation,
            options.marker_tokens,
            runtime if device == "cpu" or runtime != "torch" else f"torch ({device})",
            time.perf_counter() - started,
        )

    @property
    def tokenizer(self):
        """A tokenizer for splitting text into passages; hold ``chunk_lock``
        while using it (the encoding threads use their own instances)."""
        return self._chunk_tokenizer

    @property
    def passage_token_budget(self) -> int:
        return self.checkpoint.doc_tokenizer.content_token_budget()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, kept: torch.Tensor, onnx: bool):
        """(token vectors (b, L, dim) float32 normalised, zero where not
        ``kept``; pooled vectors (b, hidden) or None) from one forward pass,
        as ``ColBERT.doc`` and ``ColBERT.query`` compute the former."""
        model = self.checkpoint
        with torch.inference_mode(), model.amp_manager.context():
            if onnx and self._onnx is not None:
                hidden = self._onnx(ids, mask).to(self.device)
            else:
                hidden = model.bert(ids.to(self.device), attention_mask=mask.to(self.device))[0]
            vectors = model.linear(hidden) * kept.to(self.device).unsqueeze(-1)
            vectors = torch.nn.functional.normalize(vectors.float(), p=2, dim=2).cpu()
            pooled = mean_pool(hidden, mask.to(self.device)).cpu() if self.dense_dim else None
        return vectors, pooled

    def encode_query(self, query: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token vectors (1, L, dim) float32, dense vector (1, hidden) or None)."""
        return self._encode_queries([query])

    def encode_queries(self, queries: list[str]) -> torch.Tensor:
        """(len(queries), L, dim) float32, L2-normalised rows (L: query_maxlen
        with augmentation, else the longest query)."""
        return self._encode_queries(list(queries))[0]

    def _encode_queries(self, queries: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._query_lock:
            ids, mask = self.checkpoint.query_tokenizer.tensorize(queries)
        # ColBERT.query masks only padding (augmentation's [MASK]s count).
        return self._forward(ids, mask, ids != self._pad_id, onnx=False)

    def encode_documents(self, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """Packed token vectors (sum(doclens), dim) float16 and per-text lengths."""
        encoded = self.encode_passages(texts)
        return encoded.embs, encoded.doclens

    def encode_passages(self, texts: list[str]) -> EncodedPassages:
        """Token vectors and the dense vector of each text, from one forward pass.

        Texts are tokenized once without padding, sorted by length and
        encoded in batches of about ``batch_tokens`` positions, each padded
        only to its own longest text: upstream's ``docFromText`` pads every
        batch to the longest text of the whole call, so most of what it
        computes is padding when lengths vary.
        """
        if not texts:
            dense = torch.empty(0, self.dense_dim, dtype=torch.float16) if self.dense_dim else None
            return EncodedPassages(torch.empty(0, self.dim, dtype=torch.float16), [], dense)
        with self._doc_lock:
            token_ids = self.checkpoint.doc_tokenizer.token_ids(texts)
        vectors: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        pooled = torch.empty(len(texts), self.dense_dim, dtype=torch.float16) if self.dense_dim else None
        for batch in length_batches([len(t) for t in token_ids], self.batch_tokens):
            ids, mask = pad_batch([token_ids[i] for i in batch], self._pad_id)
            kept = mask.bool() & ~torch.isin(ids, self._skiplist) & (ids != self._pad_id)
            D, P = self._forward(ids, mask, kept, onnx=True)
            D = D.to(torch.float16)
            for row, i in enumerate(batch):
                vectors[i] = D[row][kept[row]]
            if pooled is not None and P is not None:
                pooled[torch.tensor(batch)] = P.to(torch.float16)
        return EncodedPassages(torch.cat(vectors), [int(v.size(0)) for v in vectors], pooled)

    def token_states(self, texts: list[str], queries: bool = False, layer: int | None = None) -> TokenStates:
        """The hidden states of ``texts`` encoded as queries or as passages:
        the last ones at the positions ``encode_queries`` or
        ``encode_passages`` keep, before the linear layer and normalisation;
        or, with ``layer``, those entering transformer layer ``layer`` (0: the
        embeddings' output). Always on torch (an ONNX int8 transformer's
        states differ a little from the weights')."""
        model = self.checkpoint
        if queries:
            with self._query_lock:
                all_ids, all_mask = model.query_tokenizer.tensorize(list(texts))
            rows = list(range(len(texts)))
            batches = [rows[i : i + QUERY_STATE_ROWS] for i in range(0, len(rows), QUERY_STATE_ROWS)]
        else:
            with self._doc_lock:
                token_ids = model.doc_tokenizer.token_ids(list(texts))
            batches = length_batches([len(t) for t in token_ids], self.batch_tokens)
        states: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        attention: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        kept_rows: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        dense = None
        if self.dense_dim is not None and layer is None:
            dense = torch.empty(len(texts), self.dense_dim, dtype=torch.float16)
        for batch in batches:
            if queries:
                ids, mask = all_ids[batch], all_mask[batch]
                kept = ids != self._pad_id  # as ColBERT.query: augmentation's [MASK]s count
            else:
                ids, mask = pad_batch([token_ids[i] for i in batch], self._pad_id)
                kept = mask.bool() & ~torch.isin(ids, self._skiplist) & (ids != self._pad_id)
            with torch.inference_mode(), model.amp_manager.context():
                out = model.bert(
                    ids.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=layer is not None
                )
                hidden = (out.hidden_states[layer] if layer is not None else out[0]).float().cpu()
            for row, i in enumerate(batch):
                if layer is None:
                    states[i] = hidden[row][kept[row]].to(torch.float16)
                    continue
                width = int(torch.nonzero(mask[row].bool() | kept[row]).max()) + 1
                states[i] = hidden[row, :width].to(torch.float16)
                attention[i] = mask[row, :width].bool()
                kept_rows[i] = kept[row, :width]
            if dense is not None:
                dense[torch.tensor(batch, dtype=torch.int64)] = mean_pool(hidden, mask).to(torch.float16)
        if layer is None:
            return TokenStates(states, dense)
        return TokenStates(states, None, attention, kept_rows)

    def maxsim(self, query: str, texts: list[str]) -> list[float]:
        """Exact ColBERT scores of ``texts`` for ``query`` (no index)."""
        from colbert.modeling.colbert import colbert_score_packed

        Q = self.encode_queries([query])
        embs, doclens = self.encode_documents(texts)
        scores = colbert_score_packed(Q, embs.float(), torch.tensor(doclens, dtype=torch.int64))
        return scores.tolist()
