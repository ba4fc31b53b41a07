"""Document encoder runtimes: speed and what each costs in retrieval.

For each runtime (torch, onnxruntime fp32, onnxruntime dynamic int8) the
same passages of msmarco-mini and business-reports are encoded in one run,
each document split into passages as the server splits it (its title
prefixed); queries are encoded by torch (as the server does) and documents
ranked by their best passage under exhaustive MaxSim, so the nDCG@10
differences are the document encoder's alone.
Runtimes alternate per dataset and the speed is the median of ``--rounds``
timed encodes of a sample. Usage: python -m bench.encoder_runtime
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.engine.encoder import RUNTIMES, ColBERTEncoder
from bench.data import DATA, load, mean_ndcg, passage_text
from colbert_patches.model_loading import EncoderOptions
from models.build_default_checkpoint import ensure_default_checkpoint

DATASETS = {"msmarco-mini": DATA, "business-reports": DATA.parent / "business-reports"}


def passages(encoder, corpus: list[dict]) -> tuple[list[str], list[str]]:
    """(document id, passage text) of every passage, split as the server splits."""
    from app.ingest.pipeline import DocumentInput, DocumentPreparer
    from app.ingest.pipeline import passage_text as server_text

    prepared = DocumentPreparer(encoder).prepare(
        [DocumentInput(d["_id"], d["text"], title=d.get("title") or None) for d in corpus]
    )
    owners, texts = [], []
    for doc in prepared:
        for p in doc.chunks:
            owners.append(doc.external_id)
            texts.append(server_text(doc.title, p.text))
    return owners, texts


def rank(encoder, queries: dict[str, str], embs: torch.Tensor, doclens: list[int], owners: list[str]):
    """The top 10 documents per query, each scored by its best passage."""
    from colbert.modeling.colbert import colbert_score_packed

    packed, lens = embs.float(), torch.tensor(doclens, dtype=torch.int64)
    runs = {}
    for qid, text in queries.items():
        scores = colbert_score_packed(encoder.encode_queries([text]), packed, lens)
        best: dict[str, float] = {}
        for owner, score in zip(owners, scores.tolist()):
            best[owner] = max(score, best.get(owner, float("-inf")))
        runs[qid] = sorted(best, key=best.__getitem__, reverse=True)[:10]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "colbert-minilm-l6")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "colbert-onnx-models")
    parser.add_argument("--sample", type=int, default=500, help="passages timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    checkpoint = str(ensure_default_checkpoint(args.checkpoint))
    options = EncoderOptions.for_checkpoint(checkpoint)
    encoders = {r: ColBERTEncoder(checkpoint, options, runtime=r, models_dir=args.models_dir) for r in RUNTIMES}
    data = {name: load(path) for name, path in DATASETS.items()}
    sample = [passage_text(d) for d in data["msmarco-mini"][0][: args.sample]]
    timings: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    for enc in encoders.values():
        enc.encode_documents(sample[:32])  # warm
    for _ in range(args.rounds):
        for runtime, enc in encoders.items():
            started = time.perf_counter()
            enc.encode_documents(sample)
            timings[runtime].append(time.perf_counter() - started)
    ndcg: dict[str, dict[str, float]] = {r: {} for r in RUNTIMES}
    for name, (corpus, queries, qrels) in data.items():
        owners, texts = passages(encoders["torch"], corpus)
        judged = {q: t for q, t in queries.items() if q in qrels}
        for runtime, enc in encoders.items():
            embs, doclens = enc.encode_documents(texts)
            ndcg[runtime][name] = mean_ndcg(rank(encoders["torch"], judged, embs, doclens, owners), qrels)
    base = statistics.median(timings["torch"])
    print(
        f"Document encoder runtimes ({args.sample} msmarco passages, median of {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads; documents ranked by their best passage, exhaustive MaxSim, "
        "queries on torch)\n"
    )
    print("| runtime | passages/s | vs torch | nDCG@10 msmarco-mini | nDCG@10 business-reports |")
    print("| --- | --- | --- | --- | --- |")
    for runtime in RUNTIMES:
        median = statistics.median(timings[runtime])
        cells = " | ".join(f"{ndcg[runtime][n]:.4f} ({ndcg[runtime][n] - ndcg['torch'][n]:+.4f})" for n in DATASETS)
        print(f"| {runtime} | {args.sample / median:.1f} | {base / median:.2f}x | {cells} |")


if __name__ == "__main__":
    main()
