"""Load benchmark: concurrent searches while a writer upserts continuously.

The production server (uvicorn, ``--workers 2``, as ``scripts/serve.sh``
starts it; :class:`bench.scale_proc.Server`) on a fresh data directory, with
the default checkpoint (built under the data directory on first start) or,
with ``--standin``, :class:`bench.standin.StandInEncoder`. It preloads
msmarco-mini's passages (``--preload``), then for ``--duration`` seconds:

- ``--clients`` search clients (default 16), closed loop, no think time: each
  sends one search, waits for the answer, sends the next. Queries are
  msmarco-mini's 50, modes drawn from ``--modes`` (default colbert 2 : hybrid
  1 : keyword 1; colbert is the API's default and loads the engine, hybrid
  adds FTS5 and fusion to it, keyword is FTS5 alone).
- One writer client: upserts of ``--writer-batch`` documents with
  ``wait=false`` (new passages from the corpus stream, replacements of its
  own earlier documents, and each batch one probe document whose text no
  other passage shares), and a DELETE every ``--delete-every`` upserts. It
  posts again as soon as fewer than ``--max-unseen`` of its upserts are
  still unseen by search, so it keeps the writer busy without an ever
  growing backlog.
- A prober: searches (colbert) for the oldest unseen probe document's words
  (:class:`bench.scale_client.ProbeTexts`) until it ranks in the top 10:
  upsert-to-visible, from the upsert's POST to the first search that finds it.

Every answer that is not 2xx, every timeout and dropped connection counts as
an error (goal: none), and every search result naming a document whose
DELETE had returned before the search was sent counts as a stale hit. The
memory (RSS, PSS) of the master and each worker is sampled every
``--memory-interval`` seconds. The clients share one asyncio event loop
in this process (httpx.AsyncClient), so they cost little of the CPU the
server is measured on; the run reports what this process, the server and
everything else on the machine used.

Writes ``bench/results/load-<date>.json`` and prints a table.

    python -m bench.load                                   # 10 minutes, real encoder
    python -m bench.load --duration 60 --preload 1000      # a short run
    python -m bench.load --standin --duration 60           # the engine alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench import scale_client as sc
from bench.corpus import ScaleCorpus
from bench.scale import environment, extra_env
from bench.scale_proc import ROOT, Server, free_port

COLLECTION = "load"
_STAMP = time.strftime("%Y%m%d-%H%M%S")


# --- pure helpers -----------------------------------------------------------


def parse_modes(text: str) -> dict[str, float]:
    """``colbert:2,hybrid:1,keyword:1`` -> weights by mode (a bare mode weighs 1)."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        mode, _, weight = part.strip().partition(":")
        if not mode:
            continue
        if mode not in ("colbert", "hybrid", "keyword"):
            raise argparse.ArgumentTypeError(f"unknown search mode {mode!r}")
        value = float(weight) if weight else 1.0
        if value < 0:
            raise argparse.ArgumentTypeError(f"negative weight for {mode}")
        if value:
            weights[mode] = value
    if not weights:
        raise argparse.ArgumentTypeError("no search mode with a weight")
    return weights


def latency(values: list[float], scale: float = 1000.0) -> dict:
    """n, p50, p95, p99, max of ``values`` (seconds) in ms; None figures when empty."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    return {
        "n": len(values),
        "p50": sc.percentile(values, 50) * scale,
        "p95": sc.percentile(values, 95) * scale,
        "p99": sc.percentile(values, 99) * scale,
        "max": max(values) * scale,
    }


def transport_outcome(exc: BaseException) -> str:
    """How a request that got no HTTP answer ended."""
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return "connection_dropped"
    return type(exc).__name__


def slope_per_minute(series: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute; None under 3 points."""
    if len(series) < 3:
        return None
    n = len(series)
    mean_t = sum(t for t, _ in series) / n
    mean_v = sum(v for _, v in series) / n
    var = sum((t - mean_t) ** 2 for t, _ in series)
    if var == 0:
        return None
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in series) / var


@dataclass
class Tally:
    """Requests by kind: the outcome of each (a status code, ``timeout``,
    ``connect_error``, ...), the latency of each 2xx, the first few errors."""

    outcomes: dict[str, Counter] = field(default_factory=dict)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    first_errors: list[dict] = field(default_factory=list)
    keep_errors: int = 20

    def record(self, kind: str, outcome: str, seconds: float, at: float = 0.0, detail: str = "") -> None:
        self.outcomes.setdefault(kind, Counter())[outcome] += 1
        if outcome.startswith("2"):
            self.latencies.setdefault(kind, []).append(seconds)
        elif len(self.first_errors) < self.keep_errors:
            self.first_errors.append(
                {"at_s": round(at, 3), "kind": kind, "outcome": outcome, "seconds": round(seconds, 3), "detail": detail}
            )

    def total(self, prefix: str = "") -> int:
        return sum(sum(c.values()) for k, c in self.outcomes.items() if k.startswith(prefix))

    def errors(self) -> dict[str, dict[str, int]]:
        """Outcomes other than 2xx, by kind."""
        out = {}
        for kind, counts in sorted(self.outcomes.items()):
            bad = {o: n for o, n in sorted(counts.items()) if not o.startswith("2")}
            if bad:
                out[kind] = bad
        return out

    def error_count(self) -> int:
        return sum(sum(bad.values()) for bad in self.errors().values())

    def ok_latencies(self, prefix: str) -> list[float]:
        return [s for k, values in self.latencies.items() if k.startswith(prefix) for s in values]


def process_report(series: list[dict], pid: int) -> dict:
    """Start, end, max and slope of one process's RSS and PSS over the memory
    series, and the medians of its first and last quarter (a step such as a
    segment loaded or a peak at the start moves them less than it moves the
    two end points)."""
    points = [(s["t"], p) for s in series for p in s["processes"] if p["pid"] == pid]
    if not points:
        return {}
    first, last = points[0][1], points[-1][1]
    out = {"pid": pid, "role": last["role"]}
    for key in ("rss_mib", "pss_mib"):
        out[f"start_{key}"] = first.get(key)
        out[f"end_{key}"] = last.get(key)
        out[f"max_{key}"] = max(p.get(key, 0.0) for _, p in points)
        out[f"growth_{key}"] = (last.get(key) or 0.0) - (first.get(key) or 0.0)
        out[f"slope_{key[:-4]}_mib_per_min"] = slope_per_minute([(t, p[key]) for t, p in points if key in p])
        values = [p[key] for _, p in points if key in p]
        quarter = max(1, len(values) // 4)
        out[f"first_quarter_median_{key}"] = statistics.median(values[:quarter]) if values else None
        out[f"last_quarter_median_{key}"] = statistics.median(values[-quarter:]) if values else None
    return out


# --- the server's processes --------------------------------------------------


def processes(server: Server, writer_pid: int | None) -> list[dict]:
    """Master and workers: pid, role, memory figures, CPU seconds."""
    from bench.scale_proc import process_memory

    out = []
    procs = [(server.process.pid, "master")] if server.alive() else []
    procs += [(p.pid, "writer" if p.pid == writer_pid else "reader") for p in server.worker_processes()]
    for pid, role in procs:
        figures = process_memory(pid)
        try:
            times = psutil.Process(pid).cpu_times()
            cpu = times.user + times.system
        except psutil.Error:
            cpu = None
        out.append({"pid": pid, "role": role, "cpu_s": cpu, **figures})
    return out


def connection_owners(server: Server) -> dict[int, int]:
    """Client port -> pid of the worker holding the server end of that
    connection (the kernel hands each new connection to one worker, and a
    keep-alive connection stays with it)."""
    owners = {}
    for proc in server.worker_processes():
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port == server.port and conn.raddr:
                    owners[conn.raddr.port] = proc.pid
        except psutil.Error:
            continue
    return owners


def client_port(response: httpx.Response) -> int | None:
    """The local port of the connection that carried ``response``."""
    try:
        return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])
    except (KeyError, TypeError, IndexError, AttributeError, ValueError):
        return None


def machine_cpu() -> dict:
    """Busy CPU seconds of the whole machine and of this process, now."""
    total = psutil.cpu_times()
    idle = total.idle + getattr(total, "iowait", 0.0)
    me = psutil.Process().cpu_times()
    return {
        # guest time is already in user time; steal is time the machine did not get
        "busy_s": sum(total) - idle - sum(getattr(total, k, 0.0) for k in ("steal", "guest", "guest_nice")),
        "client_s": me.user + me.system,
        "loadavg": os.getloadavg(),
    }


def cpu_shares(before: dict, after: dict, server_before: list[dict], server_after: list[dict], seconds: float) -> dict:
    """Cores used on average by the server, this client and everything else."""
    by_pid = {p["pid"]: p["cpu_s"] for p in server_before if p["cpu_s"] is not None}
    server = sum(p["cpu_s"] - by_pid.get(p["pid"], 0.0) for p in server_after if p["cpu_s"] is not None)
    busy = after["busy_s"] - before["busy_s"]
    client = after["client_s"] - before["client_s"]
    return {
        "cores": psutil.cpu_count(),
        "machine_busy_cores": busy / seconds,
        "server_cores": server / seconds,
        "client_cores": client / seconds,
        "other_cores": max(0.0, busy - server - client) / seconds,
        "loadavg_before": before["loadavg"],
        "loadavg_after": after["loadavg"],
    }


def log_errors(path: Path, keep: int = 10) -> dict:
    """Tracebacks and ERROR lines in the server log."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"count": None, "first": []}
    hits = [line for line in lines if "Traceback" in line or " ERROR" in line or line.startswith("ERROR")]
    return {"count": len(hits), "first": hits[:keep]}


# --- the load ----------------------------------------------------------------


@dataclass
class Probe:
    doc_id: str
    query: str
    posted: float  # perf_counter at the POST
    port: int | None = None  # client port of the last search for it


@dataclass
class Load:
    """What the clients, the writer and the prober share."""

    options: argparse.Namespace
    corpus: ScaleCorpus
    probes: sc.ProbeTexts
    started: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tally: Tally = field(default_factory=Tally)
    unseen: deque = field(default_factory=deque)
    live: list[str] = field(default_factory=list)  # the writer's documents, none of them unseen probes
    deleted: dict[str, float] = field(default_factory=dict)  # id -> perf_counter when its DELETE returned
    stale_hits: list[dict] = field(default_factory=list)
    visible: list[float] = field(default_factory=list)
    missing: list[Probe] = field(default_factory=list)  # probes not found within --visible-timeout
    recall_misses: list[Probe] = field(default_factory=list)  # found only with a $document_id filter
    upserts: int = 0
    documents: Counter = field(default_factory=Counter)  # new / replaced / probe / deleted
    statuses: Counter = field(default_factory=Counter)  # per-document upsert results
    stream: int = 0  # next corpus passage for the writer
    took: dict[str, list[float]] = field(default_factory=dict)  # mode -> the server's took_ms, in seconds
    by_port: dict[int, list[float]] = field(default_factory=dict)  # client port -> search latencies
    port_owner: dict[int, int] = field(default_factory=dict)  # client port -> the worker pid that accepted it

    async def send(self, client: httpx.AsyncClient, kind: str, method: str, url: str, **kw) -> httpx.Response | None:
        """One request, recorded in the tally; the response when 2xx, else None."""
        t0 = time.perf_counter()
        try:
            r = await client.request(method, url, **kw)
        except httpx.HTTPError as exc:
            self.tally.record(kind, transport_outcome(exc), time.perf_counter() - t0, t0 - self.started, repr(exc))
            return None
        seconds = time.perf_counter() - t0
        if r.is_success:
            self.tally.record(kind, str(r.status_code), seconds)
            return r
        self.tally.record(kind, str(r.status_code), seconds, t0 - self.started, r.text[:300])
        return None

    def check_stale(self, ids: list[str], sent: float, mode: str) -> None:
        for doc_id in ids:
            gone = self.deleted.get(doc_id)
            if gone is not None and gone < sent:
                self.stale_hits.append({"at_s": round(sent - self.started, 3), "id": doc_id, "mode": mode})

    async def search_client(self, client: httpx.AsyncClient, n: int) -> None:
        rng = random.Random(self.options.seed * 1000 + n)
        # Client n starts n/clients of --ramp seconds in: with no ramp, every
        # client's connection opens at once.
        await asyncio.sleep(self.options.ramp * n / self.options.clients)
        queries = list(self.corpus.queries.values())
        modes, weights = zip(*self.options.modes.items(), strict=True)
        i = n * 7
        while not self.stop.is_set():
            mode = rng.choices(modes, weights)[0]
            body = {"query": queries[i % len(queries)], "k": self.options.k, "mode": mode}
            i += 1
            sent = time.perf_counter()
            r = await self.send(client, f"search:{mode}", "POST", f"/v1/collections/{COLLECTION}/search", json=body)
            if r is not None:
                seconds = time.perf_counter() - sent
                body = r.json()
                self.check_stale([hit["document_id"] for hit in body["results"]], sent, mode)
                self.took.setdefault(mode, []).append(float(body.get("took_ms", 0.0)) / 1000)
                port = client_port(r)
                if port is not None:
                    self.by_port.setdefault(port, []).append(seconds)

    def next_passage(self) -> dict:
        doc = self.corpus.passage(self.options.preload + self.stream)
        self.stream += 1
        return doc

    def writer_batch(self, rng: random.Random) -> tuple[list[dict], Probe]:
        text, query = self.probes.next()
        probe = Probe(f"load-probe-{self.upserts:06d}", query, 0.0)
        docs = [{"id": probe.doc_id, "text": text}]
        for _ in range(self.options.writer_batch - 1):
            passage = self.next_passage()
            doc_id = self.live[rng.randrange(len(self.live))] if self.live else ""
            if doc_id and rng.random() < self.options.replace_share and doc_id not in {d["id"] for d in docs}:
                self.documents["replaced"] += 1
            else:
                doc_id = f"load-doc-{self.stream:07d}"
                self.live.append(doc_id)
                self.documents["new"] += 1
            docs.append(
                {"id": doc_id, "text": passage["text"], **({"title": passage["title"]} if "title" in passage else {})}
            )
        return docs, probe

    async def writer(self, client: httpx.AsyncClient) -> None:
        rng = random.Random(self.options.seed)
        while not self.stop.is_set():
            if len(self.unseen) >= self.options.max_unseen:
                await asyncio.sleep(0.02)
                continue
            docs, probe = self.writer_batch(rng)
            probe.posted = time.perf_counter()
            body = {"documents": docs, "wait": False}
            r = await self.send(client, "upsert", "POST", f"/v1/collections/{COLLECTION}/documents", json=body)
            self.upserts += 1
            if r is not None:
                self.statuses.update(result["status"] for result in r.json()["results"])
                self.documents["probe"] += 1
                self.unseen.append(probe)
            if self.options.delete_every and self.upserts % self.options.delete_every == 0 and self.live:
                doc_id = self.live.pop(rng.randrange(len(self.live)))
                url = f"/v1/collections/{COLLECTION}/documents/{doc_id}"
                if await self.send(client, "delete", "DELETE", url) is not None:
                    self.deleted[doc_id] = time.perf_counter()
                    self.documents["deleted"] += 1

    async def prober(self, client: httpx.AsyncClient, drain_until: list[float]) -> None:
        """Upsert-to-visible. Each round, a search (colbert, k=10) for the
        oldest unseen probe's words; once it is found, the next one's at once
        (one commit often lands several). Commits land in order, so while the
        oldest is not found the ones behind it are not checked, unless it has
        been unseen for over ``--stuck-after`` seconds: one document that never
        shows up must not hold back the figures of the rest. Such a probe is
        also looked for with a ``$document_id`` filter (the allowed passages
        scored exactly): found that way, it is in the index but PLAID's
        approximate top 10 missed it, a recall miss rather than a late commit,
        and it leaves the upsert-to-visible figures."""
        while not self.stop.is_set() or (self.unseen and time.perf_counter() < drain_until[0]):
            for probe in list(self.unseen):
                found = await self.found(client, probe)
                now = time.perf_counter()
                if found:
                    self.visible.append(now - probe.posted)
                    self.unseen.remove(probe)
                    self.live.append(probe.doc_id)
                elif now - probe.posted > self.options.visible_timeout:
                    self.missing.append(probe)
                    self.unseen.remove(probe)
                elif now - probe.posted <= self.options.stuck_after:
                    break
                elif await self.found(client, probe, by_id=True):
                    self.recall_misses.append(probe)
                    self.unseen.remove(probe)
            await asyncio.sleep(self.options.poll_interval if self.unseen else 0.02)
        self.missing.extend(self.unseen)
        self.unseen.clear()

    async def found(self, client: httpx.AsyncClient, probe: Probe, by_id: bool = False) -> bool:
        body: dict = {"query": probe.query, "k": 10, "mode": "colbert"}
        if by_id:
            body["filter"] = {"$document_id": [probe.doc_id]}
        r = await self.send(client, "probe", "POST", f"/v1/collections/{COLLECTION}/search", json=body)
        if r is None:
            return False
        probe.port = client_port(r)
        return probe.doc_id in [hit["document_id"] for hit in r.json()["results"]]

    async def inspect(self, server: Server, client: httpx.AsyncClient, probe: Probe) -> dict:
        """What the server says of a probe never found: its document's state,
        the worker that answered the prober's last search, and the probe's
        rank (k=10 and k=100, colbert) in searches on fresh connections, each
        with the worker that answered it."""
        owners = connection_owners(server)
        out: dict = {
            "id": probe.doc_id,
            "posted_at_s": round(probe.posted - self.started, 3),
            "prober_worker": owners.get(probe.port) if probe.port is not None else None,
        }
        try:
            r = await client.get(f"/v1/collections/{COLLECTION}/documents/{probe.doc_id}")
            doc = r.json() if r.status_code == 200 else {}
            out.update(
                status=r.status_code, state=doc.get("state"), error=doc.get("error"), chunks=len(doc.get("chunks", []))
            )
            out["searches"] = []
            for _ in range(3 * server.workers):
                async with httpx.AsyncClient(base_url=server.base, timeout=client.timeout) as fresh:
                    for k in (10, 100):
                        body = {"query": probe.query, "k": k, "mode": "colbert"}
                        r = await fresh.post(f"/v1/collections/{COLLECTION}/search", json=body)
                        ids = [hit["document_id"] for hit in r.json()["results"]]
                        worker = connection_owners(server).get(client_port(r) or -1)
                        rank = ids.index(probe.doc_id) + 1 if probe.doc_id in ids else None
                        out["searches"].append({"worker": worker, "k": k, "rank": rank})
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            out["inspect_error"] = repr(exc)
        return out


async def sample_memory(server: Server, writer_pid: int | None, load: Load, series: list[dict]) -> None:
    while True:
        procs = await asyncio.to_thread(processes, server, writer_pid)
        load.port_owner.update(await asyncio.to_thread(connection_owners, server))
        series.append(
            {"t": round(time.perf_counter() - load.started, 1), "loadavg": os.getloadavg(), "processes": procs}
        )
        try:
            await asyncio.wait_for(load.stop.wait(), load.options.memory_interval)
            return
        except TimeoutError:
            pass


async def run_load(server: Server, load: Load, writer_pid: int | None) -> dict:
    options = load.options
    limits = httpx.Limits(max_connections=options.clients + 8, max_keepalive_connections=options.clients + 8)
    timeout = httpx.Timeout(options.timeout, connect=10.0)
    series: list[dict] = []
    drain_until = [float("inf")]
    async with httpx.AsyncClient(base_url=server.base, timeout=timeout, limits=limits) as client:
        cpu_before, server_before = machine_cpu(), processes(server, writer_pid)
        load.started = time.perf_counter()
        tasks = [asyncio.create_task(load.search_client(client, n)) for n in range(options.clients)]

        tasks += [
            asyncio.create_task(load.writer(client)),
            asyncio.create_task(sample_memory(server, writer_pid, load, series)),
        ]
        prober = asyncio.create_task(load.prober(client, drain_until))
        await asyncio.sleep(options.duration)
        load.stop.set()
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - load.started
        cpu_after, server_after = machine_cpu(), processes(server, writer_pid)
        series.append({"t": round(seconds, 1), "loadavg": os.getloadavg(), "processes": server_after})
        load.port_owner.update(connection_owners(server))
        drain_until[0] = time.perf_counter() + options.visible_timeout
        await prober
        drained = time.perf_counter() - load.started - seconds
        missing = [await load.inspect(server, client, probe) for probe in load.missing[:20]]
        recall_misses = [await load.inspect(server, client, probe) for probe in load.recall_misses[:5]]
    return {
        "seconds": seconds,
        "drain_s": drained,
        "cpu": cpu_shares(cpu_before, cpu_after, server_before, server_after, seconds),
        "memory_series": series,
        "missing": missing,
        "recall_misses": recall_misses,
    }


def by_worker(by_port: dict[int, list[float]], owners: dict[int, int], roles: dict[int, str]) -> dict[str, dict]:
    """Search latencies and connections grouped by the worker that served them."""
    grouped: dict[str, dict] = {}
    for port, values in by_port.items():
        pid = owners.get(port)
        name = f"{roles.get(pid, 'worker')} {pid}" if pid is not None else "unknown"
        entry = grouped.setdefault(name, {"connections": 0, "values": []})
        entry["connections"] += 1
        entry["values"].extend(values)
    return {name: {"connections": e["connections"], "ms": latency(e["values"])} for name, e in sorted(grouped.items())}


def summarize(load: Load, run: dict, server: Server, writer_pids: tuple, monitor: sc.Monitor, t0: float) -> dict:
    tally, seconds = load.tally, run["seconds"]
    searches = tally.ok_latencies("search:")
    series = run["memory_series"]
    pids = [p["pid"] for p in series[0]["processes"]] if series else []
    pids += [p["pid"] for p in series[-1]["processes"] if p["pid"] not in pids] if series else []
    return {
        "seconds": seconds,
        "requests": tally.total(),
        "errors": tally.error_count(),
        "errors_by_kind": tally.errors(),
        "first_errors": tally.first_errors,
        "stale_hits": len(load.stale_hits),
        "first_stale_hits": load.stale_hits[:10],
        "search": {
            "requests": tally.total("search:"),
            "per_s": len(searches) / seconds,
            "ms": latency(searches),
            "server_took_ms": {mode: latency(values) for mode, values in sorted(load.took.items())},
            "by_worker": by_worker(
                load.by_port, load.port_owner, {p["pid"]: p["role"] for s in series for p in s["processes"]}
            ),
            "by_mode_ms": {
                k.split(":", 1)[1]: latency(v) for k, v in sorted(tally.latencies.items()) if k.startswith("search:")
            },
        },
        "upsert": {
            "requests": tally.total("upsert"),
            "per_s": len(tally.latencies.get("upsert", [])) / seconds,
            "documents_per_s": len(tally.latencies.get("upsert", [])) * load.options.writer_batch / seconds,
            "ack_ms": latency(tally.latencies.get("upsert", [])),
            "documents": dict(load.documents),
            "statuses": dict(load.statuses),
        },
        "delete": {"requests": tally.total("delete"), "ms": latency(tally.latencies.get("delete", []))},
        "upsert_to_visible_s": {**latency(load.visible, 1.0), "not_visible_in_time": len(load.missing)},
        "probes_not_visible": run["missing"],
        "recall_misses": len(load.recall_misses),
        "first_recall_misses": run["recall_misses"],
        "probe_searches": tally.total("probe"),
        "drain_s": run["drain_s"],
        "commits": monitor.commit_pauses(COLLECTION, t0, t0 + seconds),
        "cpu": run["cpu"],
        "writer_lease_pid": {"start": writer_pids[0], "end": writer_pids[1]},
        "processes": [process_report(series, pid) for pid in pids],
        "memory_series": series,
    }


# --- the report ----------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def table(result: dict) -> str:
    """The figures as a Markdown table, then one row per server process."""
    load = result.get("load") or {}
    search, upsert = load.get("search", {}), load.get("upsert", {})
    visible = load.get("upsert_to_visible_s", {})
    cpu = load.get("cpu", {})
    errors = "; ".join(f"{k} {v}" for k, v in load.get("errors_by_kind", {}).items()) or "none"
    rows = [
        ("duration", f"{load.get('seconds', 0):.0f} s, {result.get('options', {}).get('clients')} search clients"),
        ("requests", f"{load.get('requests', 0):,}"),
        ("errors (goal 0)", f"{load.get('errors', 0)} ({errors})"),
        ("deleted documents in results", str(load.get("stale_hits", 0))),
        ("search p50 / p95 / p99", " / ".join(_ms(search.get("ms", {}).get(p)) for p in ("p50", "p95", "p99")) + " ms"),
    ]
    for mode, figures in search.get("by_mode_ms", {}).items():
        rows.append(
            (
                f"  {mode} p50 / p95 / p99",
                " / ".join(_ms(figures.get(p)) for p in ("p50", "p95", "p99")) + f" ms ({figures.get('n', 0):,})",
            )
        )
    for mode, figures in search.get("server_took_ms", {}).items():
        rows.append((f"  {mode} server took_ms p50 / p95", f"{_ms(figures.get('p50'))} / {_ms(figures.get('p95'))} ms"))
    for worker, figures in search.get("by_worker", {}).items():
        ms = figures.get("ms", {})
        rows.append(
            (
                f"  searches served by {worker}",
                f"{ms.get('n', 0):,} on {figures.get('connections')} connections, "
                f"p50 / p95 {_ms(ms.get('p50'))} / {_ms(ms.get('p95'))} ms",
            )
        )
    rows += [
        ("searches per second", f"{search.get('per_s', 0):.1f}"),
        ("upserts per second", f"{upsert.get('per_s', 0):.2f} ({upsert.get('documents_per_s', 0):.1f} documents/s)"),
        (
            "upsert ack p50 / p95",
            f"{_ms(upsert.get('ack_ms', {}).get('p50'))} / {_ms(upsert.get('ack_ms', {}).get('p95'))} ms",
        ),
        (
            "upsert-to-visible p50 / p95",
            f"{_ms(visible.get('p50'))} / {_ms(visible.get('p95'))} s ({visible.get('n', 0)} probes, {visible.get('not_visible_in_time', 0)} not seen)",
        ),
        ("probes in the index but not in the top 10 (recall misses)", str(load.get("recall_misses", 0))),
        (
            "commits; longest pause",
            f"{load.get('commits', {}).get('commits')}; {load.get('commits', {}).get('longest_pause_s', 0):.1f} s",
        ),
        (
            "CPU cores used: server / client / other",
            f"{cpu.get('server_cores', 0):.2f} / {cpu.get('client_cores', 0):.2f} / {cpu.get('other_cores', 0):.2f} of {cpu.get('cores')}",
        ),
        (
            "load average before / after",
            f"{cpu.get('loadavg_before', [0])[0]:.2f} / {cpu.get('loadavg_after', [0])[0]:.2f}",
        ),
        ("server log errors", str(result.get("server_log_errors", {}).get("count"))),
        (
            "writer lease pid at start / end",
            " / ".join(str(load.get("writer_lease_pid", {}).get(k)) for k in ("start", "end")),
        ),
    ]
    lines = ["| figure | value |", "| --- | --- |", *(f"| {a} | {b} |" for a, b in rows)]
    collection = load.get("collection", {})
    start, end = collection.get("start") or {}, collection.get("end") or {}
    if start or end:
        size = " → ".join(
            f"{c.get('documents', 0):,} documents, {(c.get('index') or {}).get('bytes', 0) / 2**20:,.0f} MiB index"
            for c in (start, end)
        )
        lines.append(f"| collection start → end | {size} |")
    lines += [
        "",
        "| process | RSS start → end (max) MiB | PSS start → end (max) MiB | PSS median, first → last quarter MiB | PSS slope MiB/min |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in load.get("processes", []):
        if not p:
            continue
        slope = p.get("slope_pss_mib_per_min")
        lines.append(
            f"| {p['role']} {p['pid']} | {_ms(p.get('start_rss_mib'))} → {_ms(p.get('end_rss_mib'))} ({_ms(p.get('max_rss_mib'))}) "
            f"| {_ms(p.get('start_pss_mib'))} → {_ms(p.get('end_pss_mib'))} ({_ms(p.get('max_pss_mib'))}) "
            f"| {_ms(p.get('first_quarter_median_pss_mib'))} → {_ms(p.get('last_quarter_median_pss_mib'))} "
            f"| {'-' if slope is None else f'{slope:+.2f}'} |"
        )
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--clients", type=int, default=16, help="concurrent search clients")
    p.add_argument(
        "--modes", type=parse_modes, default=parse_modes("colbert:2,hybrid:1,keyword:1"), metavar="MODE:W,.."
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--ramp",
        type=float,
        default=10.0,
        help="seconds over which the search clients start (0: all at once, and one worker may accept every connection)",
    )
    p.add_argument("--preload", type=int, default=5000, help="passages indexed before the load (msmarco-mini first)")
    p.add_argument("--writer-batch", type=int, default=8, help="documents per upsert, one of them a probe")
    p.add_argument(
        "--replace-share", type=float, default=0.3, help="share of the other documents that replace earlier ones"
    )
    p.add_argument("--delete-every", type=int, default=5, help="a DELETE after every N upserts (0: none)")
    p.add_argument("--max-unseen", type=int, default=4, help="upserts not yet seen by search before the writer waits")
    p.add_argument("--poll-interval", type=float, default=0.2, help="seconds between a probe's searches")
    p.add_argument("--visible-timeout", type=float, default=300.0, help="seconds before a probe counts as not seen")
    p.add_argument(
        "--stuck-after", type=float, default=15.0, help="seconds before a probe stops holding back later ones"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request, seconds")
    p.add_argument("--memory-interval", type=float, default=15.0, help="seconds between memory samples")
    p.add_argument("--standin", action="store_true", help="the stand-in encoder (bench/standin.py), not the real one")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--set", action="append", default=[], metavar="VAR=VALUE", help="extra server env")
    p.add_argument("--keep-data", action="store_true", help="keep the server's data directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    options = p.parse_args(argv)
    if options.writer_batch < 1 or options.clients < 1 or options.max_unseen < 1:
        p.error("--writer-batch, --clients and --max-unseen must be at least 1")
    return options


def collection_state(server: Server) -> dict:
    """The collection's counts and index report (``GET /v1/collections/load``)."""
    try:
        body = httpx.get(f"{server.base}/v1/collections/{COLLECTION}", timeout=60).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {k: body.get(k) for k in ("generation", "documents", "pending_documents", "chunks", "index")}


def preload(server: Server, monitor: sc.Monitor, corpus: ScaleCorpus, options) -> dict:
    """The first ``--preload`` passages in through the API (sc.ingest), then warm searches on fresh connections."""
    if options.preload:
        ingest_options = argparse.Namespace(ingest_clients=2, max_backlog=2000, settle_timeout=4 * 3600.0)
        done = sc.ingest(server, monitor, sc.Feeder(corpus, 250), COLLECTION, options.preload, ingest_options)
    else:
        done = {}
    sc.settle(server, monitor, [COLLECTION], 600)
    queries = list(corpus.queries.values())
    with httpx.Client(base_url=server.base, timeout=sc.TIMEOUT, headers={"Connection": "close"}) as client:
        for i in range(4 * server.workers):
            for mode in options.modes:
                body = {"query": queries[i % len(queries)], "k": options.k, "mode": mode}
                client.post(f"/v1/collections/{COLLECTION}/search", json=body).raise_for_status()
    return {k: done.get(k) for k in ("passages", "seconds", "passages_per_s", "chunks")}


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    encoder = "standin" if options.standin else "real"
    result: dict = {
        "environment": environment(),
        "command": "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "options": {k: v for k, v in vars(options).items() if k != "out"},
        "encoder": "StandInEncoder (bench/standin.py)" if options.standin else "the default checkpoint (MiniLM)",
    }
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / f"load-{_STAMP}.json"
    workdir = Path(tempfile.mkdtemp(prefix="colbert-load-"))
    server = Server(
        workdir / "data", options.port or free_port(), options.workers, encoder, extra_env(options),
        options.out / f"load-{_STAMP}-server.log",
    )  # fmt: skip
    corpus = ScaleCorpus(seed=options.seed)
    server.start()
    monitor = sc.Monitor(server, [COLLECTION], interval=1.0, memory_interval=5.0)
    try:
        result["first_ready_s"] = server.wait_ready()
        print(
            f"server ready after {result['first_ready_s']:.0f} s ({encoder} encoder, {options.workers} workers)",
            flush=True,
        )
        with httpx.Client(base_url=server.base, timeout=sc.TIMEOUT) as client:
            client.post("/v1/collections", json={"name": COLLECTION}).raise_for_status()
        monitor.start()
        result["preload"] = preload(server, monitor, corpus, options)
        print(
            f"preloaded {options.preload:,} passages; {options.clients} clients for {options.duration:.0f} s",
            flush=True,
        )
        writer_start = sc.writer_state(server.base) or {}
        collection_start = collection_state(server)
        load = Load(options, corpus, sc.ProbeTexts(options.seed))
        t0 = time.monotonic()
        run = asyncio.run(run_load(server, load, writer_start.get("lease_holder_pid")))
        writer_end = sc.writer_state(server.base) or {}
        pids = (writer_start.get("lease_holder_pid"), writer_end.get("lease_holder_pid"))
        result["load"] = summarize(load, run, server, pids, monitor, t0)
        result["load"]["collection"] = {"start": collection_start, "end": collection_state(server)}
        result["writer_end"] = writer_end
        result["server_alive_at_end"] = server.alive()
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        monitor.stop()
        result["stop_s"] = server.stop()
        result["server_log"] = str(server.log_path)
        result["server_log_errors"] = log_errors(server.log_path)
        if options.keep_data:
            result["data_dir"] = str(server.data_dir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}\n")
    print(table(result))


if __name__ == "__main__":
    main()
