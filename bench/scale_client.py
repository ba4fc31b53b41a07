"""The scale benchmark's HTTP side: what a client sees of the server.

- :class:`Monitor` polls each collection's ``generation`` and counts
  (``GET /v1/collections/{name}``) and the server's memory, so that a phase
  can tell when everything it posted is indexed and how long commits paused.
- :class:`Feeder` hands out the corpus stream in batches to loader threads.
- The phases: bulk ingest, search latency, upsert-to-visible probes, cold start.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import dataclass

import httpx

from bench.corpus import ScaleCorpus
from bench.scale_proc import CLOSE, Server

TIMEOUT = httpx.Timeout(600.0, connect=30.0)


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]


def spread(values: list[float], scale: float = 1.0) -> dict:
    """n, p50, p95, max of ``values`` times ``scale``; None figures when empty."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    return {
        "n": len(values),
        "p50": statistics.median(values) * scale,
        "p95": percentile(values, 95) * scale,
        "max": max(values) * scale,
    }


class ServerErrors:
    """5xx answers and dropped connections that a request was retried past:
    server faults, counted in the results rather than ending a long run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[float, str, str]] = []

    def record(self, where: str, detail: str) -> None:
        with self._lock:
            self.events.append((time.time(), where, detail))

    def reset(self) -> None:
        with self._lock:
            self.events.clear()

    def summary(self) -> dict:
        with self._lock:
            return {"count": len(self.events), "first": [f"{w}: {d}" for _, w, d in self.events[:5]]}


SERVER_ERRORS = ServerErrors()
RETRIES = 3


def post(client: httpx.Client, url: str, body: dict, retry: bool = True) -> httpx.Response:
    """POST; with ``retry``, a 5xx or a dropped connection is recorded in
    :data:`SERVER_ERRORS` and tried again (1, 2, 4 s apart)."""
    if not retry:
        r = client.post(url, json=body)
        r.raise_for_status()
        return r
    for attempt in range(RETRIES + 1):
        try:
            r = client.post(url, json=body)
            if r.status_code < 500:
                r.raise_for_status()
                return r
            detail = f"{r.status_code} {r.text[:300]}"
        except httpx.TransportError as exc:
            detail = repr(exc)
        SERVER_ERRORS.record(f"POST {url}", detail)
        if attempt == RETRIES:
            raise RuntimeError(f"POST {url} failed {RETRIES + 1} times; last: {detail}")
        time.sleep(2**attempt)
    raise AssertionError("unreachable")


def search(client: httpx.Client, collection: str, query: str, k: int = 10, retry: bool = True):
    """(document ids ranked, server-side took_ms)."""
    body = post(client, f"/v1/collections/{collection}/search", {"query": query, "k": k}, retry).json()
    return [hit["document_id"] for hit in body["results"]], float(body.get("took_ms", 0.0))


def upsert(client: httpx.Client, collection: str, docs: list[dict], wait: bool) -> dict[str, int]:
    """Statuses of the upsert's results, counted."""
    r = post(client, f"/v1/collections/{collection}/documents", {"documents": docs, "wait": wait})
    counts: dict[str, int] = {}
    for result in r.json()["results"]:
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    return counts


def writer_state(base: str, tries: int = 8) -> dict | None:
    """``/ready``'s writer block from the worker that holds the writer lease
    (fresh connections until that worker answers), else None."""
    for _ in range(tries):
        try:
            r = httpx.get(f"{base}/ready", headers=CLOSE, timeout=30)
            writer = r.json().get("writer") or (r.json().get("details") or {}).get("writer")
        except (httpx.HTTPError, ValueError):
            continue
        if writer and writer.get("role") == "writer":
            return writer
    return None


@dataclass(frozen=True)
class Sample:
    t: float
    generation: int
    documents: int
    pending: int
    chunks: int
    segments: int | None = None  # from the collection's index report, when the server gives one
    kind: str | None = None


class Monitor(threading.Thread):
    """Polls collections (and the server's memory) until stopped."""

    def __init__(self, server: Server, names: list[str], interval: float, memory_interval: float = 2.0):
        super().__init__(name="monitor", daemon=True)
        self.server = server
        self.names = names
        self.interval = interval
        self.memory_interval = memory_interval
        self.samples: dict[str, list[Sample]] = {name: [] for name in names}
        self.memory: list[tuple[float, float, float]] = []  # (t, total rss MiB, total pss MiB)
        self._stop_event = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        next_memory = 0.0
        with httpx.Client(base_url=self.server.base, timeout=TIMEOUT) as client:
            while not self._stop_event.is_set():
                for name in self.names:
                    try:
                        r = client.get(f"/v1/collections/{name}")
                        if r.status_code != 200:
                            continue
                        c = r.json()
                    except (httpx.HTTPError, ValueError):
                        continue
                    index = c.get("index") or {}
                    sample = Sample(
                        time.monotonic(),
                        c["generation"],
                        c["documents"],
                        c["pending_documents"],
                        c["chunks"],
                        index.get("segments"),
                        index.get("kind"),
                    )
                    with self._lock:
                        self.samples[name].append(sample)
                if time.monotonic() >= next_memory:
                    rss, pss = self.server.memory_totals()
                    if rss:
                        self.memory.append((time.monotonic(), rss, pss))
                    next_memory = time.monotonic() + self.memory_interval
                self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(60)

    def latest(self, name: str) -> Sample | None:
        with self._lock:
            return self.samples[name][-1] if self.samples[name] else None

    def wait_for(self, name: str, after: float, documents: int, timeout: float) -> Sample:
        """The first sample taken after ``after`` with nothing pending and at least ``documents`` live."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.latest(name)
            if s is not None and s.t > after and s.pending == 0 and s.documents >= documents:
                return s
            time.sleep(self.interval / 4)
        raise TimeoutError(f"{name}: not indexed after {timeout:.0f}s (last: {self.latest(name)})")

    def window(self, name: str, t0: float, t1: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples[name] if t0 <= s.t <= t1]

    def commit_pauses(self, name: str, t0: float, t1: float) -> dict:
        """Commits seen in [t0, t1] and the longest time the generation stood
        still while documents were pending (resolution: the poll interval)."""
        samples = self.window(name, t0, t1)
        longest, commits, since = 0.0, 0, None
        for prev, cur in zip(samples, samples[1:]):
            if cur.generation != prev.generation:
                commits += cur.generation - prev.generation
                if since is not None:
                    longest = max(longest, cur.t - since)
                since = cur.t if cur.pending else None
            elif cur.pending == 0:
                since = None
            elif since is None:
                since = prev.t if prev.pending else cur.t
            else:
                longest = max(longest, cur.t - since)
        segments = [s.segments for s in samples if s.segments is not None]
        return {
            "commits": commits,
            "longest_pause_s": longest,
            "samples": len(samples),
            "max_segments": max(segments) if segments else None,
            "kinds": sorted({s.kind for s in samples if s.kind}),
        }

    def peak_memory(self, t0: float, t1: float) -> dict:
        inside = [m for m in self.memory if t0 <= m[0] <= t1]
        if not inside:
            return {"peak_total_rss_mib": None, "peak_total_pss_mib": None}
        return {"peak_total_rss_mib": max(m[1] for m in inside), "peak_total_pss_mib": max(m[2] for m in inside)}


class Feeder:
    """The corpus stream from ``position`` on, in batches, to any number of threads."""

    def __init__(self, corpus: ScaleCorpus, batch: int, position: int = 0):
        self.corpus = corpus
        self.batch = batch
        self.position = position
        self._lock = threading.Lock()

    def take(self, stop: int, size: int | None = None) -> list[dict]:
        with self._lock:
            lo = self.position
            hi = min(stop, lo + (size or self.batch))
            self.position = max(lo, hi)
            return [self.corpus.passage(i) for i in range(lo, hi)]


def ingest(server: Server, monitor: Monitor, feeder: Feeder, name: str, stop: int, options) -> dict:
    """Bulk-load the stream up to passage ``stop`` (``wait=false`` POSTs from
    ``options.ingest_clients`` threads, at most ``options.max_backlog``
    documents pending), then wait until all of it is indexed."""
    before = monitor.latest(name)
    documents_before = before.documents if before else 0
    posted: list[int] = []
    statuses: dict[str, int] = {}
    errors: list[BaseException] = []
    lock = threading.Lock()

    def post_all() -> None:
        with httpx.Client(base_url=server.base, timeout=TIMEOUT) as client:
            while not errors:
                docs = feeder.take(stop)
                if not docs:
                    return
                while (s := monitor.latest(name)) is not None and s.pending > options.max_backlog:
                    time.sleep(0.2)
                try:
                    counts = upsert(client, name, docs, wait=False)
                except (httpx.HTTPError, RuntimeError) as exc:
                    errors.append(exc)
                    return
                with lock:
                    posted.append(len(docs))
                    for key, n in counts.items():
                        statuses[key] = statuses.get(key, 0) + n

    started = time.monotonic()
    threads = [threading.Thread(target=post_all) for _ in range(options.ingest_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"ingest failed: {errors[0]!r}")
    posted_s = time.monotonic() - started
    fresh = sum(posted) - statuses.get("unchanged", 0)
    done = monitor.wait_for(name, time.monotonic(), documents_before + fresh, options.settle_timeout)
    seconds = done.t - started
    return {
        "passages": sum(posted),
        "statuses": statuses,
        "seconds": seconds,
        "post_seconds": posted_s,
        "passages_per_s": sum(posted) / seconds if seconds > 0 else None,
        "chunks": done.chunks,
        "documents": done.documents,
        **monitor.commit_pauses(name, started, done.t),
        **monitor.peak_memory(started, done.t),
    }


def settle(server: Server, monitor: Monitor, names: list[str], timeout: float) -> float:
    """Seconds until nothing is pending and the writer (and its background work) is idle."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        pending = [monitor.latest(n) for n in names]
        if all(s is not None and s.t > started and s.pending == 0 for s in pending):
            writer = writer_state(server.base)
            if writer is None or not writer.get("busy"):
                return time.monotonic() - started
        time.sleep(0.5)
    return time.monotonic() - started


def search_latency(server: Server, name: str, queries: list[str], requests: int, threads: int) -> dict:
    """Warm every worker, then ``requests`` searches (k=10) from ``threads`` threads."""
    for query in queries[: 4 * max(1, server.workers)]:  # fresh connections reach both workers
        with httpx.Client(base_url=server.base, timeout=TIMEOUT, headers=CLOSE) as client:
            search(client, name, query)
    latencies: list[float] = []
    took: list[float] = []
    lock = threading.Lock()

    def run(offset: int, count: int) -> None:
        with httpx.Client(base_url=server.base, timeout=TIMEOUT) as client:
            for i in range(count):
                t0 = time.perf_counter()
                _, took_ms = search(client, name, queries[(offset + i) % len(queries)])
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    took.append(took_ms / 1000)

    per_thread = max(1, requests // threads)
    started = time.perf_counter()
    pool = [threading.Thread(target=run, args=(n * 7, per_thread)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - started
    return {
        "threads": threads,
        "http_ms": spread(latencies, 1000),
        "server_took_ms": spread(took, 1000),
        "searches_per_s": len(latencies) / wall if wall > 0 else None,
    }


class ProbeTexts:
    """One-document upserts whose text no other passage shares: random
    whole words of the tokenizer's vocabulary, so a search for their first
    words finds them at rank 1 once they are visible."""

    def __init__(self, seed: int):
        from models.build_default_checkpoint import bundled_minilm_dir

        vocab = (bundled_minilm_dir() / "vocab.txt").read_text().split("\n")
        self.words = [w for w in vocab if w.isalpha() and w.isascii() and len(w) >= 4]
        self.rng = random.Random(seed)

    def next(self) -> tuple[str, str]:
        words = self.rng.sample(self.words, 40)
        return " ".join(words) + ".", " ".join(words[:16])


def upsert_visible(server: Server, feeder: Feeder, probes: ProbeTexts, target: str, loaded: str, options) -> dict:
    """Upsert-to-visible of ``options.probes`` one-document upserts
    (``wait=true``) into ``target``, while a loader thread keeps
    bulk-loading the stream into ``loaded`` (batches of
    ``options.loader_batch``, ``wait=true``, back to back)."""
    stop = threading.Event()
    loaded_passages: list[int] = []
    loader_errors: list[BaseException] = []

    def load() -> None:
        with httpx.Client(base_url=server.base, timeout=TIMEOUT) as client:
            while not stop.is_set():
                docs = feeder.take(10**9, options.loader_batch)
                try:
                    upsert(client, loaded, docs, wait=True)
                except (httpx.HTTPError, RuntimeError) as exc:
                    loader_errors.append(exc)
                    return
                loaded_passages.append(len(docs))

    loader = threading.Thread(target=load, name="loader")
    loader.start()
    deadline = time.monotonic() + 60
    while not loaded_passages and time.monotonic() < deadline and loader.is_alive():
        time.sleep(0.1)  # the loader's first batch is in: the writer has a backlog
    started = time.monotonic()
    acks, visible, misses = [], [], 0
    with httpx.Client(base_url=server.base, timeout=TIMEOUT) as client:
        for n in range(options.probes):
            text, query = probes.next()
            doc_id = f"probe-{target}-{feeder.position}-{n}"
            t0 = time.perf_counter()
            upsert(client, target, [{"id": doc_id, "text": text}], wait=True)
            acks.append(time.perf_counter() - t0)
            while True:
                ids, _ = search(client, target, query)
                if doc_id in ids:
                    visible.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() - t0 > options.visible_timeout:
                    misses += 1
                    break
                time.sleep(0.05)
    ended = time.monotonic()
    stop.set()
    loader.join()
    return {
        "target": target,
        "loaded": loaded,
        "ack_s": spread(acks),
        "visible_s": spread(visible),
        "not_visible_in_time": misses,
        "loader_passages": sum(loaded_passages),
        "loader_passages_per_s": sum(loaded_passages) / (ended - started) if ended > started else None,
        "loader_errors": [repr(e) for e in loader_errors],
        "window": (started, ended),
    }


def cold_start(server: Server, name: str, query: str, timeout: float) -> dict:
    """Restart the server; seconds to ``/ready`` and to the first search answered."""
    stop_s = server.stop()
    server.start()
    ready_s = server.wait_ready(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with httpx.Client(base_url=server.base, timeout=TIMEOUT, headers=CLOSE) as client:
                t0 = time.perf_counter()
                search(client, name, query, retry=False)
                first_search_ms = (time.perf_counter() - t0) * 1000
            return {
                "stop_s": stop_s,
                "ready_s": ready_s,
                "first_search_s": time.monotonic() - server.started_at,
                "first_search_request_ms": first_search_ms,
            }
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(f"no search answered within {timeout:.0f}s of a restart")
