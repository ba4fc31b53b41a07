"""Which 384 -> dim projection for the default checkpoint: quality against bytes per token.

The default checkpoint (``models/build_default_checkpoint.py``) is
all-MiniLM-L6-v2 plus a fixed, seeded random orthogonal 384 -> 128 linear
layer. This measures it against projections that need no training data, on
msmarco-mini and business-reports (``../shared/bench``), with exhaustive
MaxSim (every passage scored, no PLAID pruning):

- ``default``: the checkpoint exactly as the server encodes it
  (``ColBERTEncoder``, the default options);
- ``identity-384``: the 384-dim hidden states the projection reads, with the
  same tokens kept (punctuation skiplist, padding) and L2 normalisation;
- ``random-N``: the first N rows of the same seeded orthogonal matrix;
- ``pca-own-N``: PCA of the collection's own document token vectors (what a
  fit at a collection's first index build would see);
- ``pca-other-N``: PCA fitted on the other dataset's document token vectors,
  a stand-in for a public text sample shipped with the package;
- ``pca-vocab-N``: PCA fitted on generated text, seeded random sequences of
  MiniLM's own whole-word vocabulary: a sample that needs no corpus at all.

Every PCA comes in two forms. ``uncentred``: the top eigenvectors of the
second-moment matrix, a plain linear layer (the checkpoint format as it is).
``centred``: the token mean subtracted, then the covariance's top
eigenvectors; the mean can be folded into the bias of BERT's last LayerNorm
(the hidden states are that LayerNorm's output), so it too fits a standard
checkpoint. ``identity-384-centred`` is the shift alone. ``whitened`` (at
128 dims): centred, each component then scaled to unit variance.

Documents are split as the server splits them (``DocumentPreparer``: the
checkpoint's passage budget, the title before each chunk), each chunk
encoded whole; a document's score is the best of its chunks' and documents
are ranked (no duplicates). Each row is scored on float vectors (stored as
float16, as the server's exact tier does) and, for the rows in ``--codec``,
again after PLAID's residual compression (a codec trained on the row's own
vectors, ``nbits`` bits per dimension, decompressed and scored exhaustively).
Bytes per token: PLAID stores a 4-byte centroid code and ``dim * nbits / 8``
bytes of residuals per token (the server's measured index adds about 3 bytes
for doclens and its IVF); float16 is ``2 * dim``.

business-reports is reported twice: with its judgments as shipped, where
only q_15 of the 11 judged queries is judged against the report it was
written for (the others were given the corpus's first reports in order), and
``business-reports-realigned``, the same judgments given to the queries
written for each report (22 queries; bench/qrels/README.md).

BM25 (bm25s) and dense mean-pooled MiniLM come from ``bench.msmarco_mini`` as
references (each corpus entry whole; dense truncates at 256 word-pieces).
Every row is compared with ``default`` query by query: mean difference,
queries better / worse, and a paired bootstrap 95% interval.

Encodings are cached under ``--cache`` (default: the system temp folder),
never in the repository. Writes ``bench/results/projection-<date>.json``.

    python -m bench.projection [--codec all|none|ROW,...] [--nbits 2] [--bootstrap 10000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.data import BUSINESS_REPORTS_REKEYED, DATA, encoded_corpus, load, ndcg_at_10, read_qrels

SHARED = DATA.parent
DATASETS = ("msmarco-mini", "business-reports")
ROOT = Path(__file__).resolve().parent.parent
CODE_BYTES = 4  # PLAID's centroid code per token (int32)
FIT_BLOCK = 65536  # token vectors per block when fitting or projecting
SCORE_BLOCK_TOKENS = 32768  # document tokens per block of the exhaustive scorer
VOCAB_SEQUENCES = 1000  # generated sample: sequences of ...
VOCAB_WORDS = 100  # ... whole vocabulary words each
VOCAB_SEED = 20240611


@dataclass
class Encoded:
    """One dataset as the benchmark scores it: chunks, their token vectors
    (the server's and the pre-projection hidden states, same tokens), the
    judged queries' token vectors, one or more sets of judgments."""

    name: str
    doc_ids: list[str]
    chunk_doc: torch.Tensor  # (chunks,) index into doc_ids
    lens: torch.Tensor  # (chunks,) kept tokens per chunk
    server: torch.Tensor  # (tokens, 128) float16: ColBERTEncoder.encode_documents
    hidden: torch.Tensor  # (tokens, 384) float16: the hidden states its projection reads
    server_queries: dict[str, torch.Tensor]  # qid -> (query tokens, 128)
    hidden_queries: dict[str, torch.Tensor]  # qid -> (query tokens, 384)
    judgments: dict[str, dict[str, dict[str, int]]]  # label -> qrels
    corpus: list[dict]
    queries: dict[str, str]  # every query judged in one of the judgments


@dataclass(frozen=True)
class Projection:
    """h -> normalise((h - shift) @ weight.T); ``weight`` None keeps all dims."""

    name: str
    family: str
    fitted_on: str
    weight: torch.Tensor | None
    shift: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return 384 if self.weight is None else int(self.weight.size(0))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        out = []
        for block in hidden.split(FIT_BLOCK):
            h = block.float()
            if self.shift is not None:
                h = h - self.shift
            if self.weight is not None:
                h = h @ self.weight.T
            out.append(torch.nn.functional.normalize(h, dim=-1))
        return torch.cat(out)


# -- encoding ---------------------------------------------------------------


def digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()[:16]


def chunk_corpus(encoder, corpus: list[dict]) -> tuple[list[str], list[int]]:
    """The texts the server would encode for ``corpus`` (its chunker, the
    title before each chunk) and the corpus entry of each."""
    from app.ingest.pipeline import DocumentInput, DocumentPreparer, passage_text

    docs = DocumentPreparer(encoder).prepare(
        [DocumentInput(d["_id"], d["text"], (d.get("title") or "").strip() or None) for d in corpus]
    )
    texts, owner = [], []
    for n, doc in enumerate(docs):
        for chunk in doc.chunks:
            texts.append(passage_text(doc.title, chunk.text))
            owner.append(n)
    return texts, owner


def hidden_states(encoder, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """(packed float16 (tokens, 384), tokens per text): the transformer's last
    hidden states at the positions ``ColBERT.doc`` keeps, batched and padded
    as ``ColBERTEncoder.encode_documents`` does; its linear layer and L2
    normalisation are what is left out."""
    from app.engine.encoder import length_batches, pad_batch

    checkpoint = encoder.checkpoint
    token_ids = checkpoint.doc_tokenizer.token_ids(texts)
    pad_id = int(checkpoint.doc_tokenizer.tok.pad_token_id or 0)
    vectors: list[torch.Tensor] = [torch.empty(0)] * len(texts)
    with torch.inference_mode():
        for batch in length_batches([len(t) for t in token_ids], encoder.batch_tokens):
            ids, mask = pad_batch([token_ids[i] for i in batch], pad_id)
            hidden = checkpoint.bert(ids, attention_mask=mask)[0]
            kept = torch.tensor(checkpoint.mask(ids, skiplist=checkpoint.skiplist), dtype=torch.bool)
            for row, i in enumerate(batch):
                vectors[i] = hidden[row][kept[row]].to(torch.float16)
    return torch.cat(vectors), [int(v.size(0)) for v in vectors]


def cached(path: Path, make: Callable[[], object]):
    if path.exists():
        return torch.load(path)
    value = make()
    torch.save(value, path)
    return value


def query_vectors(encoder, queries: dict[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per query (encoded alone, so no padding): the server's vectors and
    the hidden states under them (``ColBERT.query`` masks only padding)."""
    checkpoint = encoder.checkpoint
    server, hidden = {}, {}
    with torch.inference_mode():
        for qid, text in queries.items():
            server[qid] = encoder.encode_queries([text])[0].float()
            ids, mask = checkpoint.query_tokenizer.tensorize([text])
            hidden[qid] = checkpoint.bert(ids, attention_mask=mask)[0][0].float()
    return server, hidden


def encode_dataset(encoder, name: str, cache: Path) -> Encoded:
    corpus, queries, qrels = load(SHARED / name)
    judgments = {name: qrels}
    if name == "business-reports":
        judgments[f"{name}-realigned"] = read_qrels(BUSINESS_REPORTS_REKEYED)
    queries = {q: t for q, t in queries.items() if any(q in j for j in judgments.values())}
    texts, owner = chunk_corpus(encoder, corpus)
    key = digest(encoder.checkpoint_name, texts)
    started = time.perf_counter()
    server, lens = encoded_corpus(encoder, [{"text": t} for t in texts], cache / f"{name}-server-{key}.pt")
    hidden, hidden_lens = cached(cache / f"{name}-hidden-{key}.pt", lambda: hidden_states(encoder, texts))
    if list(lens) != list(hidden_lens):
        raise SystemExit(f"{name}: the hidden states keep other tokens than the server's encoder")
    server_queries, hidden_queries = query_vectors(encoder, queries)
    print(
        f"{name}: {len(corpus)} entries, {len(texts)} chunks, {server.size(0)} tokens, "
        f"{len(queries)} queries judged ({time.perf_counter() - started:.0f}s)",
        flush=True,
    )
    return Encoded(
        name,
        [d["_id"] for d in corpus],
        torch.tensor(owner),
        torch.tensor(lens),
        server,
        hidden,
        server_queries,
        hidden_queries,
        judgments,
        corpus,
        queries,
    )


def vocabulary_sample(encoder, cache: Path) -> torch.Tensor:
    """Hidden states of generated text: seeded sequences of MiniLM's whole
    words, drawn with Zipf weights over vocabulary order (frequent words
    come early in it). Needs nothing but the model's own files."""
    tok = encoder.checkpoint.doc_tokenizer.tok
    words = [w for w, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]) if w.isalpha() and len(w) > 1]
    weights = 1.0 / np.arange(1, len(words) + 1)
    rng = np.random.default_rng(VOCAB_SEED)
    draws = rng.choice(len(words), size=(VOCAB_SEQUENCES, VOCAB_WORDS), p=weights / weights.sum())
    texts = [" ".join(words[i] for i in row) for row in draws]
    key = digest(encoder.checkpoint_name, texts)
    return cached(cache / f"vocab-sample-hidden-{key}.pt", lambda: hidden_states(encoder, texts)[0])


# -- projections ------------------------------------------------------------


def moments(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, second moment E[h h^T]) in float64."""
    total = torch.zeros(hidden.size(1), dtype=torch.float64)
    outer = torch.zeros(hidden.size(1), hidden.size(1), dtype=torch.float64)
    for block in hidden.split(FIT_BLOCK):
        h = block.double()
        total += h.sum(0)
        outer += h.T @ h
    n = hidden.size(0)
    return total / n, outer / n


def pca(
    stats: tuple[torch.Tensor, torch.Tensor], dim: int, centred: bool, whitened: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (dim, 384), shift or None): top eigenvectors of the covariance
    (centred) or of the second moment (uncentred); ``whitened`` divides each
    component by its standard deviation (centred only)."""
    mean, second = stats
    matrix = second - torch.outer(mean, mean) if centred else second
    values, vectors = torch.linalg.eigh(matrix)  # ascending eigenvalues
    values, vectors = values.flip(0)[:dim], vectors.flip(1)[:, :dim]
    if whitened:
        vectors = vectors / values.clamp_min(1e-12).sqrt()
    return vectors.T.contiguous().float(), (mean.float() if centred else None)


Moments = dict[str, tuple[torch.Tensor, torch.Tensor]]


def projections(stats: Moments, own: str, other: str, pca_dims: list[int]) -> list[Projection]:
    """Every projection scored on ``own`` (``stats``: each sample's moments)."""
    from models.build_default_checkpoint import PROJECTION_SEED, orthogonal_projection

    out = [
        Projection("identity-384", "identity", "-", None),
        Projection("identity-384-centred", "identity", own, None, stats[own][0].float()),
    ]
    for dim in (64, 128, 256):
        out.append(Projection(f"random-{dim}", "random", "-", orthogonal_projection(384, dim, PROJECTION_SEED)))
    for source, label in ((own, "own"), (other, "other"), ("vocab", "vocab")):
        for centred in (False, True):
            for dim in pca_dims if source != "vocab" else [128]:
                weight, shift = pca(stats[source], dim, centred)
                name = f"pca-{label}-{dim}{'-centred' if centred else ''}"
                out.append(Projection(name, "pca-centred" if centred else "pca", source, weight, shift))
        if source != "vocab":
            # Whitening (each component to unit variance): evens out the
            # directions that dominate the cosine.
            weight, shift = pca(stats[source], 128, centred=True, whitened=True)
            out.append(Projection(f"pca-{label}-128-whitened", "pca-whitened", source, weight, shift))
    return out


# -- scoring ----------------------------------------------------------------


def maxsim_runs(ds: Encoded, queries: dict[str, torch.Tensor], docs: torch.Tensor, k: int = 10):
    """Top-k corpus ids per query by exhaustive MaxSim; a document scores
    the best of its chunks."""
    qids = list(queries)
    qcat = torch.cat([queries[q] for q in qids]).float()
    qstarts = np.cumsum([0] + [queries[q].size(0) for q in qids[:-1]])
    lens = ds.lens.tolist()
    starts = np.concatenate([[0], np.cumsum(lens)])
    chunk_scores = torch.empty(len(lens), len(qids))
    first = 0
    while first < len(lens):
        last = first
        while last < len(lens) and (last == first or starts[last + 1] - starts[first] <= SCORE_BLOCK_TOKENS):
            last += 1
        sims = (docs[starts[first] : starts[last]].float() @ qcat.T).numpy()
        best = np.maximum.reduceat(sims, starts[first:last] - starts[first], axis=0)
        chunk_scores[first:last] = torch.from_numpy(np.add.reduceat(best, qstarts, axis=1))
        first = last
    doc_scores = torch.full((len(ds.doc_ids), len(qids)), -math.inf)
    index = ds.chunk_doc.unsqueeze(1).expand(-1, len(qids))
    doc_scores.scatter_reduce_(0, index, chunk_scores, reduce="amax")
    top = doc_scores.topk(k, dim=0).indices.T.tolist()
    return {q: [ds.doc_ids[i] for i in row] for q, row in zip(qids, top)}


def per_query(runs: dict[str, list[str]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    return {q: ndcg_at_10(runs.get(q, []), judged) for q, judged in sorted(qrels.items())}


def compressed(vectors: torch.Tensor, dim: int, nbits: int, seed: int = 123) -> torch.Tensor:
    """``vectors`` after PLAID's residual codec (trained on them) and back."""
    from app.engine.plaid import _decompress
    from colbert_patches.codec import train_codec

    codec = train_codec(vectors, dim, nbits, seed=seed)
    out = []
    for block in vectors.split(FIT_BLOCK):
        packed = codec.compress(block.float())
        out.append(_decompress(codec, packed.codes, packed.residuals).to(torch.float16))
    return torch.cat(out)


def paired(row: dict[str, float], base: dict[str, float], resamples: int, seed: int = 0) -> dict:
    """``row`` against ``base`` query by query: mean difference, queries
    better/worse, a paired bootstrap 95% interval and the share of
    resamples where ``row`` is not ahead."""
    qids = sorted(base)
    d = np.array([row[q] - base[q] for q in qids])
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "delta": float(d.mean()),
        "better": int((d > 1e-9).sum()),
        "worse": int((d < -1e-9).sum()),
        "ci95": [float(low), float(high)],
        "p_not_ahead": float((means <= 0).mean()),
    }


def reference_runs(ds: Encoded, cache: Path) -> dict[str, dict[str, list[str]]]:
    from bench.msmarco_mini import bm25_runs, dense_runs

    key = digest([d["_id"] for d in ds.corpus], list(ds.queries.values()))
    dense = cache / f"{ds.name}-dense-runs-{key}.json"
    if not dense.exists():
        dense.write_text(json.dumps(dense_runs(ds.corpus, ds.queries)))
    return {"bm25": bm25_runs(ds.corpus, ds.queries), "dense": json.loads(dense.read_text())}


# -- the run ----------------------------------------------------------------


@dataclass
class Row:
    """One way of scoring a dataset: its top-10 per query, exact and (when
    measured) after PLAID's codec."""

    name: str
    family: str
    fitted_on: str
    dim: int | None
    runs: dict[str, list[str]]
    codec_runs: dict[str, list[str]] | None = None


def score_rows(ds: Encoded, projections: list[Projection], codec_rows: set[str], nbits: int, cache: Path):
    """(every row's runs over ``ds``, a check that the server's vectors and
    the hidden states under them agree)."""
    from models.build_default_checkpoint import COLBERT_DIM, PROJECTION_SEED, orthogonal_projection

    def codec_runs(name: str, docs: torch.Tensor, queries: dict[str, torch.Tensor], dim: int):
        if name not in codec_rows and "all" not in codec_rows:
            return None
        started = time.perf_counter()
        runs = maxsim_runs(ds, queries, compressed(docs, dim, nbits))
        print(f"  {ds.name} {name}: {nbits}-bit codec in {time.perf_counter() - started:.0f}s", flush=True)
        return runs

    rows = [
        Row(
            "default",
            "random (the checkpoint, ColBERTEncoder)",
            f"seed {PROJECTION_SEED}",
            COLBERT_DIM,
            maxsim_runs(ds, ds.server_queries, ds.server),
            codec_runs("default", ds.server, ds.server_queries, COLBERT_DIM),
        )
    ]
    # The same projection applied here to the hidden states must give the
    # server's vectors (float16 rounding apart).
    default = Projection("default", "random", "-", orthogonal_projection(384, COLBERT_DIM, PROJECTION_SEED))
    derived = default(ds.hidden)
    check = {
        "max_abs_diff_documents": float((derived - ds.server.float()).abs().max()),
        "max_abs_diff_queries": max(
            float((default(h) - ds.server_queries[q]).abs().max()) for q, h in ds.hidden_queries.items()
        ),
        "derived_default_runs": maxsim_runs(ds, ds.server_queries, derived.half()),
    }
    del derived
    for p in projections:
        docs = p(ds.hidden).half()
        queries = {q: p(h) for q, h in ds.hidden_queries.items()}
        rows.append(
            Row(
                p.name,
                p.family,
                p.fitted_on,
                p.dim,
                maxsim_runs(ds, queries, docs),
                codec_runs(p.name, docs, queries, p.dim),
            )
        )
    for name, runs in reference_runs(ds, cache).items():
        rows.append(Row(name, "reference", "-", None, runs))
    return rows, check


def judged_table(
    ds: Encoded, qrels: dict[str, dict[str, int]], rows: list[Row], check: dict, nbits: int, resamples: int
):
    """The table of one set of judgments: nDCG@10 per row, each against ``default``."""
    out: list[dict] = []
    for row in rows:
        scores = per_query(row.runs, qrels)
        entry = {
            "name": row.name,
            "family": row.family,
            "fitted_on": row.fitted_on,
            "dim": row.dim,
            "nbits": nbits if row.dim else None,
            "bytes_per_token_plaid": CODE_BYTES + row.dim * nbits / 8 if row.dim else None,
            "bytes_per_token_float16": 2 * row.dim if row.dim else None,
            "ndcg@10": float(np.mean(list(scores.values()))),
            "per_query": scores,
        }
        if row.codec_runs is not None:
            codec_scores = per_query(row.codec_runs, qrels)
            entry["ndcg@10_plaid_codec"] = float(np.mean(list(codec_scores.values())))
            entry["per_query_plaid_codec"] = codec_scores
        if out:
            entry["vs_default"] = paired(scores, out[0]["per_query"], resamples)
            if "per_query_plaid_codec" in entry and "per_query_plaid_codec" in out[0]:
                entry["vs_default_plaid_codec"] = paired(
                    entry["per_query_plaid_codec"], out[0]["per_query_plaid_codec"], resamples
                )
        out.append(entry)
    derived = per_query(check["derived_default_runs"], qrels)
    return {
        "corpus_entries": len(ds.doc_ids),
        "chunks": len(ds.lens),
        "document_tokens": int(ds.server.size(0)),
        "judged_queries": len(qrels),
        "check": {
            "max_abs_diff_documents": check["max_abs_diff_documents"],
            "max_abs_diff_queries": check["max_abs_diff_queries"],
            "ndcg@10_default_from_hidden_states": float(np.mean(list(derived.values()))),
        },
        "rows": out,
    }


def print_table(name: str, report: dict) -> None:
    print(
        f"\n{name}: {report['corpus_entries']} entries, {report['chunks']} chunks, "
        f"{report['document_tokens']} tokens, {report['judged_queries']} judged queries"
    )
    print(
        "| projection | fitted on | dim | bytes/token PLAID (nbits) | bytes/token fp16 | nDCG@10 exact "
        "| vs default: delta (95% CI), better/worse | nDCG@10 PLAID codec |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in report["rows"]:
        vs = row.get("vs_default")
        delta = (
            f"{vs['delta']:+.3f} ({vs['ci95'][0]:+.3f}, {vs['ci95'][1]:+.3f}), {vs['better']}/{vs['worse']}"
            if vs
            else ""
        )
        codec = row.get("ndcg@10_plaid_codec")
        plaid = f"{row['bytes_per_token_plaid']:g} ({row['nbits']})" if row["dim"] else ""
        print(
            f"| {row['name']} | {row['fitted_on']} | {row['dim'] or ''} | {plaid} | {row['bytes_per_token_float16'] or ''} "
            f"| {row['ndcg@10']:.3f} | {delta} | {f'{codec:.3f}' if codec is not None else ''} |"
        )
    check = report["check"]
    print(
        f"check: the default projection applied to the hidden states differs from the server's vectors by at most "
        f"{check['max_abs_diff_documents']:.4f} (documents) / {check['max_abs_diff_queries']:.4f} (queries); "
        f"nDCG@10 from them {check['ndcg@10_default_from_hidden_states']:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.projection", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "colbert-projection-bench")
    parser.add_argument("--codec", default="all", help="rows also scored after PLAID's codec: names, all, none")
    parser.add_argument("--nbits", type=int, default=2, help="residual bits per dimension (the server's default: 2)")
    parser.add_argument("--pca-dims", default="64,96,128,256")
    parser.add_argument("--bootstrap", type=int, default=10000, help="paired bootstrap resamples")
    args = parser.parse_args(argv)

    from app.engine.encoder import ColBERTEncoder
    from colbert_patches.model_loading import EncoderOptions
    from models.build_default_checkpoint import ensure_default_checkpoint

    started = time.perf_counter()
    args.cache.mkdir(parents=True, exist_ok=True)
    checkpoint = str(ensure_default_checkpoint(args.cache / "colbert-minilm-l6"))
    encoder = ColBERTEncoder(checkpoint, EncoderOptions.for_checkpoint(checkpoint))
    encoded = {name: encode_dataset(encoder, name, args.cache) for name in DATASETS}
    samples = {name: ds.hidden for name, ds in encoded.items()}
    samples["vocab"] = vocabulary_sample(encoder, args.cache)
    stats = {name: moments(sample) for name, sample in samples.items()}
    codec_rows = {r.strip() for r in args.codec.split(",") if r.strip() and r.strip() != "none"}
    pca_dims = [int(d) for d in args.pca_dims.split(",")]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "scoring": "exhaustive MaxSim; documents split by the server's chunker, a document scores its best chunk",
        "nbits": args.nbits,
        "bootstrap_resamples": args.bootstrap,
        "fit_tokens": {name: int(s.size(0)) for name, s in samples.items()},
        "datasets": {},
    }
    for name, ds in encoded.items():
        other = next(n for n in DATASETS if n != name)
        rows, check = score_rows(ds, projections(stats, name, other, pca_dims), codec_rows, args.nbits, args.cache)
        for label, qrels in ds.judgments.items():
            report["datasets"][label] = judged_table(ds, qrels, rows, check, args.nbits, args.bootstrap)
            print_table(label, report["datasets"][label])
    report["seconds"] = time.perf_counter() - started
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"projection-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"\n{path.relative_to(ROOT)} ({report['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
