"""Document encoding at the writer's slice size: batch size and text order.

The writer encodes a bulk batch in slices of about ``commit_target_s`` (about
100 passages on 2 CPU cores), so it can commit a priority upsert between two
slices. ``encode_documents`` sorts and pads by length within one call only:
a slice of 100 texts in arrival order is padded far more than 1,000 texts
in one call. This times, for each ``--batch-tokens`` value (token positions
per forward batch), the same passages of the scale corpus encoded

- ``arrival``: in slices of ``--slice`` texts, in corpus order;
- ``by length``: in groups of ``--group`` texts (a writer batch) ordered by
  length, then in slices of ``--slice`` (what the writer does);
- ``one call``: all at once (what the scale benchmark's bare figure times).

Rounds alternate the settings; the figure is the median passages/s.
Usage: python -m bench.encoder_batches
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import app.engine.encoder as encoder_module
from bench.corpus import ScaleCorpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--spread", type=int, default=100_000, help="passages taken evenly from this many")
    parser.add_argument("--slice", type=int, default=100)
    parser.add_argument("--group", type=int, default=300)
    parser.add_argument("--batch-tokens", default="1024,2048,4096,8192")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args(argv)

    from app.service import load_encoder
    from app.settings import Settings

    corpus = ScaleCorpus(seed=0)
    step = max(1, options.spread // options.passages)
    texts = [corpus.passage(i)["text"] for i in range(0, options.spread, step)][: options.passages]
    with tempfile.TemporaryDirectory() as tmp:
        encoder = load_encoder(Settings(_env_file=None, data_dir=tmp))
        encoder.encode_documents(texts[:32])  # warm

        def arrival() -> None:
            for i in range(0, len(texts), options.slice):
                encoder.encode_documents(texts[i : i + options.slice])

        def by_length() -> None:
            for g in range(0, len(texts), options.group):
                group = sorted(texts[g : g + options.group], key=len)
                for i in range(0, len(group), options.slice):
                    encoder.encode_documents(group[i : i + options.slice])

        def one_call() -> None:
            encoder.encode_documents(texts)

        ways = {"arrival": arrival, "by length": by_length, "one call": one_call}
        sizes = [int(s) for s in options.batch_tokens.split(",")]
        timings: dict[tuple[int, str], list[float]] = {(b, w): [] for b in sizes for w in ways}
        for _ in range(options.rounds):
            for size in sizes:
                encoder.batch_tokens = size
                for way, run in ways.items():
                    started = time.perf_counter()
                    run()
                    timings[(size, way)].append(len(texts) / (time.perf_counter() - started))
    print(
        f"{len(texts)} scale-corpus passages, slices of {options.slice}, groups of {options.group}, "
        f"median of {options.rounds} rounds (passages/s); the server's CPU default: {encoder_module.BATCH_TOKENS}"
    )
    print("| token positions per batch | " + " | ".join(ways) + " |")
    print("| --- | " + " | ".join("---" for _ in ways) + " |")
    for size in sizes:
        cells = " | ".join(f"{statistics.median(timings[(size, w)]):.1f}" for w in ways)
        print(f"| {size:,} | {cells} |")


if __name__ == "__main__":
    main()
