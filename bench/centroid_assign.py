"""Centroid assignment beside a busy Python thread, with and without faiss's
Python interrupt callback.

Compression assigns every new token vector to its nearest centroid through
a faiss index (``colbert_patches.codec.centroid_index``). faiss's Python
module installs a callback that its searches call every few thousand vectors
to look for Ctrl-C, and each call takes the GIL. In the server another
thread (a request, the encoder) nearly always runs Python, so each check
can wait for the interpreter's switch interval. This times one assignment
of ``--vectors`` random unit vectors against ``--centroids`` centroids,
alone and beside a thread that runs pure Python, for each faiss thread
count, with the callback as faiss installs it and removed (what
``colbert_patches.apply()`` does). Rounds alternate; figures are medians.

Usage: python -m bench.centroid_assign
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time


def _busy(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(20_000))


def _time(index, vectors, busy: bool, limit_s: float) -> float | None:
    """Seconds for one search, None past ``limit_s`` (it finishes anyway)."""
    stop = threading.Event()
    other = threading.Thread(target=_busy, args=(stop,), daemon=True)
    if busy:
        other.start()
        time.sleep(0.1)
    done = threading.Event()
    started = time.perf_counter()
    search = threading.Thread(target=lambda: (index.search(vectors, 1), done.set()), daemon=True)
    search.start()
    finished = done.wait(limit_s)
    seconds = time.perf_counter() - started
    stop.set()
    search.join()
    if busy:
        other.join()
    return seconds if finished else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--centroids", type=int, default=16384)
    p.add_argument("--vectors", type=int, default=70_000, help="about 1,000 passages of token vectors")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=float, default=20.0, help="seconds before a search counts as stalled")
    options = p.parse_args(argv)

    import faiss
    import torch

    from colbert_patches.codec import centroid_index

    gen = torch.Generator().manual_seed(0)
    centroids = torch.nn.functional.normalize(torch.randn(options.centroids, 128, generator=gen), dim=-1)
    picks = torch.randint(0, options.centroids, (options.vectors,), generator=gen)
    noise = 0.05 * torch.randn(options.vectors, 128, generator=gen)
    vectors = torch.nn.functional.normalize(centroids[picks] + noise, dim=-1).numpy()
    index = centroid_index(centroids)

    results: dict[tuple[str, int, str], list[float | None]] = {}
    for _ in range(options.rounds):
        for callback in ("faiss's callback", "no callback"):
            if callback == "no callback":
                faiss.InterruptCallback.clear_instance()
            else:
                faiss.PythonInterruptCallback.reset()
            for threads in (2, 1):
                faiss.omp_set_num_threads(threads)
                for beside in ("alone", "busy Python thread"):
                    key = (callback, threads, beside)
                    results.setdefault(key, []).append(_time(index, vectors, beside != "alone", options.limit))
    faiss.InterruptCallback.clear_instance()

    print(f"{options.vectors:,} vectors, {options.centroids:,} centroids, median of {options.rounds} rounds\n")
    print("| interrupt callback | faiss threads | beside | seconds |")
    print("| --- | --- | --- | --- |")
    for (callback, threads, beside), times in results.items():
        finished = [t for t in times if t is not None]
        stalled = len(times) - len(finished)
        figure = f"{statistics.median(finished):.3f}" if finished else "–"
        if stalled:
            figure += f" ({stalled} of {len(times)} past {options.limit:.0f} s)"
        print(f"| {callback} | {threads} | {beside} | {figure} |")


if __name__ == "__main__":
    main()
