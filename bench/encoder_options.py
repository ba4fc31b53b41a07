"""Measure what query augmentation and marker tokens do to the default model.

Exhaustive MaxSim (no PLAID) over msmarco-mini with the default MiniLM
checkpoint, for each combination of [MASK] query augmentation and [Q]/[D]
marker tokens. Usage: python -m bench.encoder_options [--limit N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from app.engine.encoder import ColBERTEncoder
from bench.data import load, mean_ndcg, passage_text
from colbert_patches.model_loading import EncoderOptions
from models.build_default_checkpoint import ensure_default_checkpoint


def exhaustive(encoder, queries, embs, doclens, ids, k=10):
    from colbert.modeling.colbert import colbert_score_packed

    embs = embs.float()
    lens = torch.tensor(doclens, dtype=torch.int64)
    runs = {}
    for qid, text in queries.items():
        scores = colbert_score_packed(encoder.encode_queries([text]), embs, lens)
        runs[qid] = [ids[i] for i in scores.topk(k).indices.tolist()]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=Path(tempfile.gettempdir()) / "colbert-minilm-l6")
    args = parser.parse_args()
    checkpoint = str(ensure_default_checkpoint(args.checkpoint))
    corpus, queries, qrels = load()
    ids = [d["_id"] for d in corpus]
    texts = [passage_text(d) for d in corpus]
    print("| [Q]/[D] markers | [MASK] augmentation | nDCG@10 |\n| --- | --- | --- |")
    for markers in (False, True):
        base = ColBERTEncoder(checkpoint, EncoderOptions(query_augmentation=False, marker_tokens=markers))
        started = time.perf_counter()
        embs, doclens = base.encode_documents(texts)
        encode_s = time.perf_counter() - started
        for augmentation in (False, True):
            enc = ColBERTEncoder(checkpoint, EncoderOptions(query_augmentation=augmentation, marker_tokens=markers))
            score = mean_ndcg(exhaustive(enc, queries, embs, doclens, ids), qrels)
            print(f"| {'on' if markers else 'off'} | {'on' if augmentation else 'off'} | {score:.3f} |", flush=True)
        print(f"(documents encoded in {encode_s:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
