"""Fault injection through real server processes: kill -9 loops and a full disk.

Each kill -9 run drives upserts (new ids, replacements, deletes; ``wait``
true and false) from client threads into a server started on one data
directory with :class:`bench.standin.StandInEncoder` (seconds per run, not
minutes), kills the server with SIGKILL at a random moment of one of three
phases, restarts it and checks every acknowledged write:

- **upserts**: plain upserts into a collection, killed at a random time;
- **first_build**: a fresh collection crossing ``exact_search_max_passages``,
  killed while its first PLAID codec is trained or its exact tier compressed;
- **rebuild**: a PLAID collection under replacements and growth, killed
  while a merge or a codec retraining is due or running.

A write is acknowledged when the server answered 200 (``wait=true``,
indexed) or 202 (stored, pending), or 204 for a delete. After the restart,
once nothing is pending, each acknowledged write must be there: ``GET``
gives its version (a unique token per version) or a later one that was
sent; its token is found by keyword search (every chunk) and by ColBERT
search (deterministic here: every PLAID cell is probed); no replaced or
deleted version is found by either; no document is ``failed``; every live
chunk's passage id is in the committed index; SQLite's integrity check
passes. Whether a kill landed inside the phase is read from the committed
state the kill left (:meth:`app.engine.plaid.PlaidBackend.plan`: a first
codec, an exact tier to compress, a merge or retraining still due).

The disk-full run puts the data directory on a small tmpfs (as root) or,
where mounting is not allowed, starts the server under ``prlimit --fsize``;
drives upserts until commits fail and on for a while, then frees the space
(or restarts without the limit) and checks the same way that every
acknowledged write is searchable and nothing is failed.

    python -m bench.faults                          # 120 kill -9 runs and the disk-full run
    python -m bench.faults --runs 12 --skip-disk-full

Prints a summary table and writes ``bench/results/faults-<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import signal
import sqlite3
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch

from bench.scale_proc import ROOT, Server, free_port

PHASES = ("upserts", "first_build", "rebuild")
EXACT_MAX = 96  # passages before the first PLAID build
# Small commits, frequent merges and retrainings, every PLAID cell probed
# (ColBERT search is then exhaustive: a miss is a missing passage, not PLAID's
# approximation).
SERVER_ENV = {
    "COLBERT_SERVER_EXACT_SEARCH_MAX_PASSAGES": str(EXACT_MAX),
    "COLBERT_SERVER_REBUILD_GROWTH_FACTOR": "1.5",
    "COLBERT_SERVER_REBUILD_DELETED_SHARE": "0.1",
    "COLBERT_SERVER_COMMIT_MAX_CHUNKS": "64",
    "COLBERT_SERVER_NCELLS": "65536",
    "COLBERT_SERVER_CENTROID_SCORE_THRESHOLD": "-10",
    "COLBERT_SERVER_NDOCS": "1000000",
    "COLBERT_SERVER_UPSERT_WAIT_TIMEOUT_S": "20",
    "COLBERT_SERVER_LOG_LEVEL": "INFO",
    "COLBERT_BENCH_STANDIN_STATS": "",
}
TRICKLE, TRICKLE_S = 128 << 10, 0.5  # bytes freed at a time while the disk is full, and how often
TOKEN_RE = re.compile(r"\bfx[a-z]{10}\b")
WORDS = "amber basalt cobalt dahlia ember fjord garnet harbor indigo juniper kelp lagoon meadow nectar orchid".split()


def new_token(rng: random.Random) -> str:
    return "fx" + "".join(rng.choice(string.ascii_lowercase) for _ in range(10))


def document_text(token: str, parts: int, rng: random.Random) -> str:
    """Paragraphs that all carry the version's token (so each chunk does)."""
    paragraphs = []
    for p in range(parts):
        filler = " ".join(rng.choice(WORDS) for _ in range(45))
        paragraphs.append(f"Record about {token} today, part {p}. {filler}. Again about {token} today.")
    return "\n\n".join(paragraphs)


# -- the client's record of what it sent and what the server acknowledged ---


@dataclass
class Op:
    collection: str
    doc_id: str
    kind: str  # "upsert" | "delete"
    token: str | None  # the version's token; None for a delete
    wait: bool
    run: int
    status: int | None = None  # HTTP status; None: no answer (the server died)
    result: str | None = None  # the document's status in the answer
    acked: bool = False


class Ledger:
    """Every write sent, per document, in the order sent (one client thread
    owns each id, so that order is the server's order too)."""

    def __init__(self) -> None:
        self.ops: dict[tuple[str, str], list[Op]] = {}
        self.dirty: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def sent(self, op: Op) -> None:
        with self._lock:
            self.ops.setdefault((op.collection, op.doc_id), []).append(op)
            self.dirty.add((op.collection, op.doc_id))

    def take_dirty(self) -> set[tuple[str, str]]:
        with self._lock:
            dirty, self.dirty = self.dirty, set()
        return dirty

    def acknowledged(self) -> int:
        return sum(op.acked for ops in self.ops.values() for op in ops)

    def acknowledged_in(self, run: int) -> int:
        return sum(op.acked and op.run == run for ops in self.ops.values() for op in ops)


class Driver:
    """Client threads writing into one collection until stopped (or the server dies)."""

    def __init__(self, base: str, collection: str, ledger: Ledger, run: int, seed: int, **mix):
        self.base, self.collection, self.ledger, self.run = base, collection, ledger, run
        self.threads_n = mix.get("threads", 2)
        self.replace_share = mix.get("replace_share", 0.3)
        self.delete_share = mix.get("delete_share", 0.08)
        self.nowait_share = mix.get("nowait_share", 0.3)
        self.batch = mix.get("batch", (1, 6))
        self.parts = mix.get("parts", (1, 3))
        self.pause = mix.get("pause", 0.0)
        self.seed = seed
        self.stop = threading.Event()
        self.died = threading.Event()
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for t in range(self.threads_n):
            thread = threading.Thread(target=self._loop, args=(t,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float = 60) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _own_ids(self, t: int) -> list[str]:
        prefix = f"t{t}-"
        with self.ledger._lock:
            keys = [d for (c, d) in self.ledger.ops if c == self.collection and d.startswith(prefix)]
        return keys

    def _loop(self, t: int) -> None:
        rng = random.Random(f"{self.seed}-{self.collection}-{self.run}-{t}")
        own = self._own_ids(t)
        counter = 0
        with httpx.Client(base_url=self.base, timeout=60) as client:
            while not self.stop.is_set():
                if own and rng.random() < self.delete_share:
                    op = Op(self.collection, rng.choice(own), "delete", None, True, self.run)
                    self.ledger.sent(op)
                    try:
                        r = client.delete(f"/v1/collections/{self.collection}/documents/{op.doc_id}")
                    except httpx.TransportError:
                        self.died.set()
                        return
                    op.status = r.status_code
                    op.acked = r.status_code in (204, 404)
                    self._count(r)
                    continue
                ops, chosen = [], set()
                for _ in range(rng.randint(*self.batch)):
                    if own and rng.random() < self.replace_share:
                        doc_id = rng.choice(own)
                    else:
                        doc_id = f"t{t}-r{self.run}-{counter}"
                        counter += 1
                    if doc_id in chosen:
                        continue
                    chosen.add(doc_id)
                    ops.append(Op(self.collection, doc_id, "upsert", new_token(rng), True, self.run))
                wait = rng.random() >= self.nowait_share
                body = {
                    "documents": [
                        {"id": op.doc_id, "text": document_text(op.token or "", rng.randint(*self.parts), rng)}
                        for op in ops
                    ],
                    "wait": wait,
                }
                for op in ops:
                    op.wait = wait
                    self.ledger.sent(op)
                    if op.doc_id not in own:
                        own.append(op.doc_id)
                try:
                    r = client.post(f"/v1/collections/{self.collection}/documents", json=body)
                except httpx.TransportError:
                    self.died.set()
                    return
                self._count(r)
                results = r.json().get("results", []) if r.status_code in (200, 202) else []
                for op, res in zip(ops, results, strict=False):
                    op.status = r.status_code
                    op.result = res.get("status")
                    op.acked = op.result in ("indexed", "pending")
                for op in ops[len(results) :]:
                    op.status = r.status_code
                if self.pause:
                    time.sleep(self.pause)

    def _count(self, r: httpx.Response) -> None:
        self.statuses[r.status_code] += 1
        if r.status_code >= 400:
            try:
                self.errors[r.json()["error"]["code"]] += 1
            except (ValueError, KeyError, TypeError):
                self.errors["(no JSON error)"] += 1
            time.sleep(0.05)


# -- the server ---------------------------------------------------------------


class FaultServer(Server):
    """One uvicorn process (one worker: SIGKILL takes the whole server)
    around the stand-in encoder, optionally under ``prefix`` (``prlimit``)."""

    def __init__(self, data_dir: Path, env: dict[str, str], log_path: Path, prefix: list[str] | None = None):
        super().__init__(data_dir, free_port(), 1, "standin", env={**SERVER_ENV, **env}, log_path=log_path)
        self.prefix = prefix or []

    def start(self) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n")
            log.flush()
            command = [*self.prefix, sys.executable, "-m", "uvicorn", "--factory", "bench.scale_server:app"]
            command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(command, cwd=ROOT, env=self.environment(), stdout=log, stderr=log)

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def wait_settled(client: httpx.Client, collections: list[str], timeout: float) -> float:
    """Seconds until no collection has pending documents; raises on timeout."""
    started = time.monotonic()
    left = list(collections)
    while left:
        info = client.get(f"/v1/collections/{left[0]}")
        if info.status_code == 404 or info.json()["pending_documents"] == 0:
            left.pop(0)
            continue
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{left[0]} still has {info.json()['pending_documents']} pending documents")
        time.sleep(0.1)
    return time.monotonic() - started


# -- what the kill left (read from the data directory) -------------------------


class DataDir:
    """Read-only looks at a server's data directory: the committed state,
    the maintenance due on it, and the store's invariants."""

    def __init__(self, data_dir: Path):
        from app.engine.plaid import PlaidBackend, PlaidConfig
        from app.settings import Settings

        env = {k.removeprefix("COLBERT_SERVER_").lower(): v for k, v in SERVER_ENV.items() if "SERVER" in k}
        keys = ("exact_search_max_passages", "rebuild_growth_factor", "rebuild_deleted_share")
        settings = Settings(_env_file=None, data_dir=data_dir, **{k: env[k] for k in keys})
        self.db = settings.database_path
        self.backend = PlaidBackend(PlaidConfig.from_settings(settings, dim=128, nbits=2))

    @contextlib.contextmanager
    def connect(self):
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        finally:
            conn.close()

    def due(self, collection: str, tries: int = 5) -> str | None:
        """The maintenance step due on the committed state of ``collection``
        ("kind: reason"), None when none is. While the server runs, the
        generation read may be two commits old by the time its manifest is
        opened (only the last two are kept): read again."""
        for _ in range(tries - 1):
            with contextlib.suppress(FileNotFoundError):
                return self._due(collection)
        return self._due(collection)

    def _due(self, collection: str) -> str | None:
        with self.connect() as conn:
            row = conn.execute("SELECT id, manifest FROM collections WHERE name = ?", (collection,)).fetchone()
            if row is None or row["manifest"] is None:
                return None
            dead = [
                r[0]
                for r in conn.execute(
                    """SELECT c.passage_id FROM documents d JOIN chunks c ON c.document_id = d.id
                       WHERE d.collection_id = ? AND d.state = 'deleted' AND c.passage_id IS NOT NULL""",
                    (row["id"],),
                )
            ]
        task = self.backend.plan(row["id"], row["manifest"], torch.tensor(dead, dtype=torch.int64))
        return None if task is None else f"{task.kind}: {task.reason}"

    def check(self, tries: int = 3) -> dict:
        """Invariants of the store and the committed indexes (call when
        settled; a merge folded in meanwhile may remove a file read: tried again)."""
        for _ in range(tries - 1):
            with contextlib.suppress(FileNotFoundError):
                return self._check()
            time.sleep(0.5)
        return self._check()

    def _check(self) -> dict:
        problems: list[str] = []
        with self.connect() as conn:
            integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if integrity != "ok":
                problems.append(f"integrity_check: {integrity}")
            failed = conn.execute("SELECT COUNT(*) FROM documents WHERE state = 'failed'").fetchone()[0]
            if failed:
                problems.append(f"{failed} documents failed")
            unindexed = conn.execute(
                """SELECT COUNT(*) FROM chunks c JOIN documents d ON d.id = c.document_id
                   WHERE d.state = 'live' AND c.passage_id IS NULL"""
            ).fetchone()[0]
            if unindexed:
                problems.append(f"{unindexed} live chunks without a passage id")
            collections = conn.execute("SELECT id, name, manifest FROM collections").fetchall()
            live = {
                c["id"]: {
                    r[0]
                    for r in conn.execute(
                        """SELECT c.passage_id FROM chunks c JOIN documents d ON d.id = c.document_id
                           WHERE d.collection_id = ? AND d.state = 'live'""",
                        (c["id"],),
                    )
                }
                for c in collections
            }
        live_passages = 0
        for c in collections:
            indexed = self._indexed_pids(c["id"], c["manifest"])
            missing = live[c["id"]] - indexed
            live_passages += len(live[c["id"]])
            if missing:
                problems.append(f"{c['name']}: {len(missing)} live passages not in the committed index")
        return {"failed": failed, "live_passages": live_passages, "integrity": integrity, "problems": problems}

    def _indexed_pids(self, collection_id: int, manifest: str | None) -> set[int]:
        if not manifest:
            return set()
        files = self.backend.files(collection_id)
        m = files.read_manifest(manifest)
        pids: list[int] = []
        for entry in m.segments:
            pids.extend(files.load(entry.name)["pids"].tolist())
        if len(pids) != len(set(pids)):
            raise AssertionError(f"collection {collection_id}: a passage id in two segments of {manifest}")
        return set(pids)


# -- checking acknowledged writes through the API ---------------------------------


@dataclass
class Verdict:
    checked: int = 0  # documents looked at
    lost: list[str] = field(default_factory=list)  # an acknowledged write not there (nor a later one)
    unsearchable: list[str] = field(default_factory=list)  # there, not found by a search
    stale: list[str] = field(default_factory=list)  # a replaced or deleted version still found
    searches: int = 0

    def merge(self, other: Verdict) -> None:
        self.checked += other.checked
        self.searches += other.searches
        self.lost += other.lost
        self.unsearchable += other.unsearchable
        self.stale += other.stale

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unsearchable or self.stale)


def _search(client: httpx.Client, collection: str, query: str, mode: str, k: int) -> list[dict]:
    r = client.post(f"/v1/collections/{collection}/search", json={"query": query, "k": k, "mode": mode})
    r.raise_for_status()
    return r.json()["results"]


def verify(client: httpx.Client, ledger: Ledger, keys) -> Verdict:
    """Each document's state against what was acknowledged; see the module docstring."""
    verdict = Verdict()
    for collection, doc_id in sorted(keys):
        ops = ledger.ops[(collection, doc_id)]
        acked = [i for i, op in enumerate(ops) if op.acked]
        # After the last acknowledged write, any later one sent may have landed too.
        allowed = {op.token for op in ops[acked[-1] :]} if acked else {op.token for op in ops} | {None}
        r = client.get(f"/v1/collections/{collection}/documents/{doc_id}")
        verdict.checked += 1
        if r.status_code == 404:
            seen = None
        else:
            r.raise_for_status()
            doc = r.json()
            tokens = {t for c in doc["chunks"] for t in TOKEN_RE.findall(c["text"])}
            seen = tokens.pop() if len(tokens) == 1 else f"{sorted(tokens)}"
            if doc["state"] != "live" or not all(seen in c["text"] for c in doc["chunks"]):
                verdict.lost.append(f"{collection}/{doc_id}: state {doc['state']}, token {seen}")
                continue
        if seen not in allowed:
            where = f"{collection}/{doc_id}"
            verdict.lost.append(f"{where}: has {seen}, acknowledged {[op.token for op in ops if op.acked][-1:]}")
            continue
        if seen is not None:
            chunks = len(doc["chunks"])
            hits = _search(client, collection, seen, "keyword", max(10, 2 * chunks))
            mine = [h for h in hits if seen in h["text"]]
            dense = _search(client, collection, f"about {seen} today", "colbert", 10)
            verdict.searches += 2
            if len(mine) != chunks or any(h["document_id"] != doc_id for h in mine):
                verdict.unsearchable.append(f"{collection}/{doc_id} {seen}: keyword found {len(mine)} of {chunks}")
            elif not any(h["document_id"] == doc_id and seen in h["text"] for h in dense):
                verdict.unsearchable.append(f"{collection}/{doc_id} {seen}: not in the colbert top 10")
        for old in {op.token for op in ops if op.token and op.token != seen}:
            verdict.searches += 2
            for mode, query in (("keyword", old), ("colbert", f"about {old} today")):
                if any(old in h["text"] for h in _search(client, collection, query, mode, 10)):
                    verdict.stale.append(f"{collection}/{doc_id}: old version {old} found by {mode} search")
    return verdict


# -- the kill -9 loop --------------------------------------------------------------


@dataclass
class RunRecord:
    run: int
    phase: str
    collection: str
    kill_after_s: float
    due_at_kill: str | None  # the maintenance step the committed state still called for
    in_phase: bool
    acknowledged: int
    in_flight: int  # writes sent and not answered when the server died
    lost: int
    unsearchable: int
    stale: int
    restart_s: float
    settle_s: float
    problems: list[str]


def _kill_when(server: FaultServer, driver: Driver, data: DataDir, phase: str, rng: random.Random) -> float:
    """Wait for the phase's moment, kill -9; seconds from the driver's start."""
    started = time.monotonic()
    if phase == "upserts":
        time.sleep(rng.uniform(0.2, 3.0))
    else:
        # Until the committed state calls for the phase's step (a first codec
        # or compressing the exact tier; any merge or retraining), then a
        # random moment of the step's time (a few tenths of a second here).
        wanted = ("first codec", "compress the exact tier") if phase == "first_build" else ("",)
        time.sleep(rng.uniform(0.0, 0.5))
        deadline = started + 30
        while time.monotonic() < deadline and not driver.died.is_set():
            due = data.due(driver.collection)
            if due is not None and any(w in due for w in wanted):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4 if phase == "first_build" else 0.25))
    server.kill9()
    return time.monotonic() - started


def kill_loop(workdir: Path, runs: int, seed: int, log=print, on_run=None) -> dict:
    """``runs`` kill -9 runs (the phases in turn) on one data directory,
    then every document written checked once more. ``on_run(partial)`` gets
    the result so far after each run (a long run keeps what it measured)."""
    rng = random.Random(seed)
    data_dir = workdir / "data"
    server = FaultServer(data_dir, {}, workdir / "server.log")
    ledger = Ledger()
    records: list[RunRecord] = []
    started = time.monotonic()
    server.start()
    server.wait_ready(300)
    data = DataDir(data_dir)
    with httpx.Client(base_url=server.base, timeout=60) as client:
        for name in ("base", "rb"):
            client.post("/v1/collections", json={"name": name}).raise_for_status()
    # The rebuild runs start on a PLAID collection.
    seed_driver = Driver(server.base, "rb", ledger, 0, seed, replace_share=0.0, delete_share=0.0, nowait_share=0)
    seed_driver.start()
    with httpx.Client(base_url=server.base, timeout=60) as client:
        deadline = time.monotonic() + 300
        while (client.get("/v1/collections/rb").json()["index"] or {}).get("kind") != "plaid":
            if time.monotonic() > deadline:
                raise TimeoutError("the rebuild collection never switched to PLAID")
            time.sleep(0.2)
    seed_driver.join()
    collections = ["base", "rb"]
    for run in range(1, runs + 1):
        phase = PHASES[(run - 1) % len(PHASES)]
        collection = {"upserts": "base", "rebuild": "rb"}.get(phase, f"fb-{run}")
        with httpx.Client(base_url=server.base, timeout=60) as client:
            if phase == "first_build":
                client.post("/v1/collections", json={"name": collection}).raise_for_status()
                collections.append(collection)
        mix = {
            "upserts": {"batch": (1, 4), "pause": 0.1},
            "first_build": {"replace_share": 0.1, "delete_share": 0.02, "batch": (1, 3)},
            "rebuild": {"replace_share": 0.6, "delete_share": 0.1, "batch": (2, 8), "pause": 0.05},
        }[phase]
        driver = Driver(server.base, collection, ledger, run, seed, **mix)
        driver.start()
        kill_after = _kill_when(server, driver, data, phase, rng)
        driver.join()
        due = data.due(collection)
        in_phase = phase == "upserts" or (
            due is not None and (phase == "rebuild" or "first codec" in due or "exact tier" in due)
        )
        in_flight = sum(op.status is None and op.run == run for ops in ledger.ops.values() for op in ops)
        restarted = time.monotonic()
        server.start()
        server.wait_ready(300)
        restart_s = time.monotonic() - restarted
        with httpx.Client(base_url=server.base, timeout=120) as client:
            settle_s = wait_settled(client, collections, 300)
            verdict = verify(client, ledger, ledger.take_dirty())
        state = data.check()
        record = RunRecord(
            run,
            phase,
            collection,
            round(kill_after, 2),
            due,
            in_phase,
            ledger.acknowledged_in(run),
            in_flight,
            len(verdict.lost),
            len(verdict.unsearchable),
            len(verdict.stale),
            round(restart_s, 1),
            round(settle_s, 1),
            verdict.lost + verdict.unsearchable + verdict.stale + state["problems"],
        )
        records.append(record)
        log(
            f"run {run:3d} {phase:<11} kill at {kill_after:5.2f}s  due: {due or '-':<60.60} "
            f"acked {record.acknowledged:3d} in flight {in_flight:2d} lost {record.lost} "
            f"unsearchable {record.unsearchable} stale {record.stale} "
            f"problems {len(record.problems)}"
        )
        for problem in record.problems[:10]:
            log(f"    {problem}")
        if on_run is not None:
            on_run(_kill_result(records, ledger, seed, started, final=None))
    # At the end: every document ever written, checked again.
    with httpx.Client(base_url=server.base, timeout=120) as client:
        wait_settled(client, collections, 300)
        final = verify(client, ledger, list(ledger.ops))
    final_state = data.check()
    server.stop()
    return _kill_result(
        records, ledger, seed, started, final={**asdict(final), "lost": len(final.lost), "store": final_state}
    )


def _kill_result(records: list[RunRecord], ledger: Ledger, seed: int, started: float, final: dict | None) -> dict:
    per_phase = {
        phase: {
            "runs": sum(r.phase == phase for r in records),
            "killed_in_phase": sum(r.phase == phase and r.in_phase for r in records),
            "acknowledged": sum(r.acknowledged for r in records if r.phase == phase),
            "in_flight": sum(r.in_flight for r in records if r.phase == phase),
            "lost": sum(r.lost for r in records if r.phase == phase),
            "runs_with_problems": sum(bool(r.problems) for r in records if r.phase == phase),
        }
        for phase in PHASES
    }
    final_ok = final is not None and not final["lost"] and not final["unsearchable"] and not final["stale"]
    return {
        "runs": len(records),
        "seed": seed,
        "per_phase": per_phase,
        "acknowledged": ledger.acknowledged(),
        "documents": len(ledger.ops),
        "lost": sum(r.lost for r in records),
        "final": final,  # None while the runs go on
        "ok": final_ok and not final["store"]["problems"] and not any(r.problems for r in records),
        "seconds": round(time.monotonic() - started, 1),
        "server_env": SERVER_ENV,
        "records": [asdict(r) for r in records],
    }


# -- disk full ---------------------------------------------------------------------


def _mount_tmpfs(where: Path, size_mb: int) -> str | None:
    """None when mounted; else why not."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)], capture_output=True, text=True
    )
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def _free_bytes(path: Path) -> int:
    import shutil

    return shutil.disk_usage(path).free


def disk_full(
    workdir: Path,
    seed: int,
    method: str = "auto",
    full_s: float = 12.0,
    room_mb: int = 8,
    restart: bool = True,
    log=print,
) -> dict:
    """Upserts into a server whose disk fills up; then space is freed and
    every acknowledged write must be searchable, nothing failed (and again
    after a restart without the limit, with ``restart``)."""
    started = time.monotonic()
    mount = workdir / "small-disk"
    why_not = None
    if method in ("auto", "tmpfs"):
        why_not = _mount_tmpfs(mount, 64)
        if why_not is not None and method == "tmpfs":
            raise RuntimeError(f"cannot mount a tmpfs: {why_not}")
    used = "tmpfs" if method != "fsize" and why_not is None else "fsize"
    data_dir = (mount if used == "tmpfs" else workdir) / "data"
    fsize = room_mb << 20
    prefix = ["prlimit", f"--fsize={fsize}", "--"] if used == "fsize" else []
    ledger = Ledger()
    server = FaultServer(data_dir, {}, workdir / "disk-full-server.log", prefix=prefix)
    ready_seen: Counter = Counter()
    degraded: list[str] = []
    timings: dict[str, float] = {}
    try:
        server.start()
        timings["start_s"] = server.wait_ready(300)
        with httpx.Client(base_url=server.base, timeout=60) as client:
            client.post("/v1/collections", json={"name": "full"}).raise_for_status()
        ballast, pieces = mount / "ballast", []
        driver = Driver(server.base, "full", ledger, 1, seed, nowait_share=0.5, replace_share=0.2, pause=0.05)
        driver.start()
        time.sleep(2.0)  # some writes land while there is room
        acked_before = ledger.acknowledged()
        if used == "tmpfs":
            # Leave room_mb: SQLite takes small documents for a while (202,
            # pending) while index commits (tens of KiB a passage in the
            # exact tier) run out of room first.
            room = max(_free_bytes(mount) - (room_mb << 20), 0)
            # Then, while full, TRICKLE bytes at a time come free: small
            # documents fit into SQLite (acknowledged) while the commits
            # that would index them (tens of KiB a passage) keep failing.
            pieces = [mount / f"ballast-{i}" for i in range(int(full_s / TRICKLE_S) + 1)]
            pieces = pieces[: max(room // TRICKLE - 1, 0)]
            subprocess.run(["fallocate", "-l", str(room - len(pieces) * TRICKLE), str(ballast)], check=True)
            for piece in pieces:
                subprocess.run(["fallocate", "-l", str(TRICKLE), str(piece)], check=True)
        first_error = None
        next_piece = 0.0
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=server.base, timeout=30) as client:
            while time.monotonic() < deadline:
                ready = client.get("/ready").json()
                ready_seen[ready.get("status")] += 1
                reason = (ready.get("writer") or {}).get("degraded")
                if reason and reason not in degraded:
                    degraded.append(reason)
                failing = reason or any(s >= 500 for s in list(driver.statuses))
                if failing and first_error is None:
                    first_error = time.monotonic()
                    acked_at_first_error = ledger.acknowledged()
                if first_error is not None and time.monotonic() - first_error > full_s:
                    break
                if first_error is not None and used == "tmpfs" and pieces and time.monotonic() > next_piece:
                    pieces.pop().unlink()
                    next_piece = time.monotonic() + TRICKLE_S
                time.sleep(0.2)
        driver.join()
        if first_error is None:
            raise RuntimeError("the disk never filled up: no commit failed")
        timings["full_s"] = time.monotonic() - first_error
        statuses, errors = dict(driver.statuses), dict(driver.errors)
        acked_while_full = ledger.acknowledged() - acked_at_first_error
        failed_while_full = failed_documents(data_dir)
        with httpx.Client(base_url=server.base, timeout=60) as client:
            pending_while_full = client.get("/v1/collections/full").json()["pending_documents"]
        # Free the space (tmpfs: drop the ballast) or lift the limit (restart).
        freed = time.monotonic()
        if used == "tmpfs":
            for piece in [ballast, *pieces]:
                piece.unlink(missing_ok=True)
        else:
            server.stop()
            server.prefix = []
            server.start()
            server.wait_ready(300)
        with httpx.Client(base_url=server.base, timeout=120) as client:
            timings["settle_after_free_s"] = wait_settled(client, ["full"], 300)
            while client.get("/ready").json()["status"] != "ready" and time.monotonic() - freed < 120:
                time.sleep(0.2)
            status_after = client.get("/ready").json()["status"]
            timings["ready_after_free_s"] = time.monotonic() - freed
            verdict = verify(client, ledger, list(ledger.ops))
        state = DataDir(data_dir).check()
        again, state_again = Verdict(), state
        if restart:
            # And once more after a restart without any limit.
            stopping = time.monotonic()
            server.stop()
            timings["stop_s"] = time.monotonic() - stopping
            if used == "tmpfs":
                subprocess.run(["mount", "-o", "remount,size=1g", str(mount)], check=True)
            server.prefix = []
            server.start()
            timings["restart_s"] = server.wait_ready(300)
            with httpx.Client(base_url=server.base, timeout=120) as client:
                wait_settled(client, ["full"], 300)
                again = verify(client, ledger, list(ledger.ops))
            state_again = DataDir(data_dir).check()
    finally:
        server.stop()
        if used == "tmpfs":
            subprocess.run(["umount", str(mount)], check=False)
    result = {
        "method": used,
        "method_detail": (
            f"tmpfs of 64 MiB mounted as root, filled with fallocate'd ballast files to leave {room_mb} MiB "
            f"after 2 s of writes; once writes fail, {TRICKLE >> 10} KiB come free every {TRICKLE_S}s; "
            "then freed by deleting the ballast while the server runs"
            if used == "tmpfs"
            else f"prlimit --fsize={fsize} on the server (mounting a tmpfs failed: {why_not}); lifted by a restart"
        ),
        "acknowledged": ledger.acknowledged(),
        "acknowledged_before_full": acked_before,
        "acknowledged_while_full": acked_while_full,
        "pending_while_full": pending_while_full,
        "failed_while_full": failed_while_full,
        "statuses": statuses,
        "errors": errors,
        "ready_statuses": dict(ready_seen),
        "degraded_reasons": degraded[:5],
        "ready_after_free": status_after,
        "lost": len(verdict.lost),
        "unsearchable": len(verdict.unsearchable),
        "stale": len(verdict.stale),
        "problems": verdict.lost + verdict.unsearchable + verdict.stale + state["problems"],
        "after_restart": {"lost": len(again.lost), "problems": again.lost + again.unsearchable + again.stale},
        "store": state,
        "store_after_restart": state_again,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "seconds": round(time.monotonic() - started, 1),
    }
    result["ok"] = not result["problems"] and again.ok and not state_again["problems"] and status_after == "ready"
    log(
        f"disk full ({used}): {result['acknowledged']} writes acknowledged ({acked_while_full} while full, "
        f"{pending_while_full} documents pending then), answers {statuses}, /ready {dict(ready_seen)}, "
        f"lost {result['lost']}, failed {state['failed']}, timings {result['timings']}"
    )
    for problem in result["problems"][:10]:
        log(f"    {problem}")
    return result


def failed_documents(data_dir: Path) -> int:
    """How many documents are ``failed`` right now (read-only; -1: unreadable)."""
    try:
        conn = sqlite3.connect(f"file:{data_dir / 'server.sqlite3'}?mode=ro", uri=True, timeout=30)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM documents WHERE state = 'failed'").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return -1


# -- report --------------------------------------------------------------------------


def summary(result: dict) -> str:
    lines = []
    kills = result.get("kill9")
    if kills:
        lines += [
            "| phase | runs | killed inside the phase | writes acknowledged | in flight at the kill | lost |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for phase, p in kills["per_phase"].items():
            lines.append(
                f"| {phase} | {p['runs']} | {p['killed_in_phase']} | {p['acknowledged']} "
                f"| {p['in_flight']} | {p['lost']} |"
            )
        lines.append(
            f"| all | {kills['runs']} | | {kills['acknowledged']} | | {kills['lost']} "
            f"(final check of {kills['documents']} documents: lost {kills['final']['lost']}) |"
        )
        lines.append(f"\nkill -9: {kills['seconds']:.0f}s, {'OK' if kills['ok'] else 'FAILED'}")
    full = result.get("disk_full")
    if full:
        lines.append(
            f"disk full ({full['method']}): acknowledged {full['acknowledged']}, lost {full['lost']}, "
            f"failed {full['store']['failed']}, answers {full['statuses']}, errors {full['errors']}, "
            f"/ready {full['ready_statuses']}, {full['seconds']:.0f}s, {'OK' if full['ok'] else 'FAILED'}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=120, help="kill -9 runs, the three phases in turn (default 120)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-kill", action="store_true", help="no kill -9 runs")
    p.add_argument("--skip-disk-full", action="store_true", help="no disk-full run")
    p.add_argument("--disk-full-method", choices=("auto", "tmpfs", "fsize"), default="auto")
    p.add_argument("--full-s", type=float, default=12.0, help="seconds the disk stays full")
    p.add_argument("--room-mb", type=int, default=8, help="MiB left free (tmpfs) or the file size limit (fsize)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None else argv}
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / f"faults-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save() -> None:  # after every run: a run cut short keeps what it measured
        path.write_text(json.dumps(result, indent=1))

    def on_run(partial: dict) -> None:
        result["kill9"] = partial
        save()

    def log(line: str) -> None:
        print(line, flush=True)

    with contextlib.ExitStack() as stack:
        workdir = options.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="faults-")))
        workdir.mkdir(parents=True, exist_ok=True)
        if not options.skip_kill:
            result["kill9"] = kill_loop(workdir / "kill9", options.runs, options.seed, log, on_run)
            save()
        if not options.skip_disk_full:
            result["disk_full"] = disk_full(
                workdir / "disk-full", options.seed, options.disk_full_method, options.full_s, options.room_mb, log=log
            )
            save()
    print(summary(result))
    print(f"wrote {path}")
    ok = all(part["ok"] for part in (result.get("kill9"), result.get("disk_full")) if part)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
