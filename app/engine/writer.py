"""The index writer: the one thread, in one process, that changes indexes.

Pending work is durable in SQLite (documents in state ``pending``), so any
process can accept writes while the process that holds ``writer.lock`` turns
them into index commits; if it dies, another process takes the lock over and
carries on from SQLite. A commit is: encode -> write segment (+ codec) ->
write manifest -> one SQLite transaction that assigns passage ids, flips the
document states and bumps the generation.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import torch

from app.engine.encoder import ColBERTEncoder
from app.engine.index import IndexFiles
from app.settings import Settings
from app.store.schema import connect
from colbert_patches.codec import codec_from_state, codec_state, train_codec

logger = logging.getLogger("app.engine")

MAX_SEGMENTS = 16
MAX_ATTEMPTS = 3  # tries of one batch before its documents are marked failed


class WriterLease:
    """An exclusive, process-wide lease on writing (an flock'd file)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class IndexWriter:
    def __init__(self, settings: Settings, encoder: ColBERTEncoder):
        self.settings = settings
        self.encoder = encoder
        self.lease = WriterLease(settings.data_dir / "writer.lock")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.busy = False
        self.last_error: str | None = None
        self._failures: dict[int, int] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the writer to stop after its current step. The lease is given
        up by the thread itself when it exits (never while a commit may still
        be running); at process exit the OS drops it anyway."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("index writer still busy after %.0fs; its work stays pending", timeout)

    def notify(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        conn = connect(self.settings.database_path)
        recovered = False
        try:
            while not self._stop.is_set():
                if not self.lease.held:
                    if self.lease.try_acquire():
                        logger.info("this process (pid %d) is the index writer", os.getpid())
                        recovered = False
                    else:
                        self._stop.wait(1.0)
                        continue
                try:
                    if not recovered:
                        self._recover(conn)
                        recovered = True
                    did_work = self.step(conn)
                    self.last_error = None
                except Exception as exc:  # keep the writer alive; the work stays pending
                    logger.exception("index writer step failed")
                    self.last_error = type(exc).__name__
                    did_work = False
                    self._stop.wait(1.0)
                if not did_work:
                    self._wake.wait(self.settings.writer_poll_interval_s)
                    self._wake.clear()
        finally:
            conn.close()
            self.lease.release()

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Drop files of commits that never reached SQLite, and orphan dirs."""
        rows = conn.execute("SELECT id, manifest FROM collections").fetchall()
        known = {str(r["id"]) for r in rows}
        for r in rows:
            files = self._files(r["id"])
            try:
                files.remove_unreferenced(files.files_of(r["manifest"]))
            except FileNotFoundError:
                pass  # collection deleted meanwhile
        if self.settings.index_root.exists():
            for path in self.settings.index_root.iterdir():
                if path.is_dir() and path.name not in known:
                    shutil.rmtree(path, ignore_errors=True)

    def _files(self, collection_id: int) -> IndexFiles:
        return IndexFiles(self.settings.index_root / str(collection_id))

    # -- work --------------------------------------------------------------

    def step(self, conn: sqlite3.Connection) -> bool:
        row = conn.execute("SELECT collection_id FROM documents WHERE state = 'pending' ORDER BY id LIMIT 1").fetchone()
        if row is not None:
            self.busy = True
            try:
                self.commit_pending(conn, row["collection_id"])
            finally:
                self.busy = False
            return True
        for r in conn.execute("SELECT id, manifest FROM collections").fetchall():
            if self._needs_rebuild(conn, r["id"], r["manifest"]):
                self.busy = True
                try:
                    self.rebuild(conn, r["id"])
                finally:
                    self.busy = False
                return True
        return False

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embs, doclens = self.encoder.encode_documents(texts)
        return embs, torch.tensor(doclens, dtype=torch.int64)

    @staticmethod
    def _passage_text(title: str | None, text: str) -> str:
        return f"{title}\n{text}" if title else text

    def _compress_segment(self, codec, pids, embs, doclens) -> dict:
        compressed = codec.compress(embs.float())
        return {
            "pids": pids,
            "doclens": doclens,
            "codes": compressed.codes.to(torch.int32),
            "residuals": compressed.residuals,
        }

    def _train(self, embs: torch.Tensor):
        return train_codec(
            embs, dim=self.encoder.dim, nbits=self.encoder.nbits, kmeans_niters=self.settings.kmeans_niters
        )

    def commit_pending(self, conn: sqlite3.Connection, collection_id: int) -> None:
        started = time.perf_counter()
        col = conn.execute(
            "SELECT generation, manifest, next_pid FROM collections WHERE id = ?", (collection_id,)
        ).fetchone()
        if col is None:
            return
        pending = conn.execute(
            "SELECT id, external_id, title FROM documents WHERE collection_id = ? AND state = 'pending' ORDER BY id",
            (collection_id,),
        ).fetchall()
        # A later pending version of the same id supersedes an earlier one.
        last_of = {d["external_id"]: d["id"] for d in pending}
        superseded = [d["id"] for d in pending if last_of[d["external_id"]] != d["id"]]
        if superseded:
            conn.executemany(
                "UPDATE documents SET state = 'deleted', updated_at = ? WHERE id = ? AND state = 'pending'",
                [(time.time(), i) for i in superseded],
            )
        docs = [d for d in pending if last_of[d["external_id"]] == d["id"]]

        batch, chunk_rows, budget = [], [], self.settings.commit_max_chunks
        for d in docs:
            rows = conn.execute("SELECT id, text FROM chunks WHERE document_id = ? ORDER BY ord", (d["id"],)).fetchall()
            if batch and len(chunk_rows) + len(rows) > budget:
                break
            batch.append(d)
            chunk_rows.extend((r["id"], self._passage_text(d["title"], r["text"])) for r in rows)
        if not batch:
            return
        try:
            embs, doclens = self._encode([t for _, t in chunk_rows])
            encoded = time.perf_counter()
            files = self._files(collection_id)
            files.ensure()
            generation = col["generation"] + 1
            first_pid = col["next_pid"]
            pids = torch.arange(first_pid, first_pid + len(chunk_rows), dtype=torch.int64)
            manifest = (
                files.read_manifest(col["manifest"])
                if col["manifest"]
                else {"codec": None, "segments": [], "built_passages": 0, "appended_passages": 0}
            )
            total = manifest["built_passages"] + manifest["appended_passages"] + len(chunk_rows)
            if manifest["codec"] is None and total <= self.settings.exact_search_max_passages:
                new_state = {"pids": pids, "doclens": doclens, "embs": embs}
                manifest = self._append(files, generation, manifest, new_state)
                manifest["appended_passages"] = total
            elif manifest["codec"] is None:
                # First PLAID build: train on every vector we have, no re-encoding.
                existing = [files.load(name) for name in manifest["segments"]]
                all_pids = torch.cat([*(s["pids"] for s in existing), pids])
                all_doclens = torch.cat([*(s["doclens"] for s in existing), doclens])
                all_embs = torch.cat([*(s["embs"] for s in existing), embs])
                codec = self._train(all_embs)
                codec_name = files.write_codec(generation, codec_state(codec))
                seg = files.write_segment(generation, self._compress_segment(codec, all_pids, all_embs, all_doclens))
                manifest = {"codec": codec_name, "segments": [seg], "built_passages": total, "appended_passages": 0}
            else:
                codec = codec_from_state(files.load(manifest["codec"]))
                new_state = self._compress_segment(codec, pids, embs, doclens)
                manifest = self._append(files, generation, manifest, new_state)
                manifest["appended_passages"] += len(chunk_rows)
            manifest["generation"] = generation
            manifest_name = files.write_manifest(generation, manifest)
            self._commit(
                conn, collection_id, col["generation"], generation, manifest_name, first_pid, chunk_rows, batch
            )
        except Exception as exc:
            logger.exception("indexing %d documents of collection %d failed", len(batch), collection_id)
            key = batch[0]["id"]  # the oldest pending document heads every retry
            self._failures[key] = self._failures.get(key, 0) + 1
            if self._failures[key] < MAX_ATTEMPTS:
                self._stop.wait(min(2 ** self._failures[key], 30))  # back off; the work stays pending
                return
            self._failures.pop(key, None)
            conn.executemany(
                "UPDATE documents SET state = 'failed', error = ?, updated_at = ? WHERE id = ? AND state = 'pending'",
                [(f"indexing failed {MAX_ATTEMPTS} times: {type(exc).__name__}", time.time(), d["id"]) for d in batch],
            )
            return
        logger.info(
            "collection %d generation %d: %d documents, %d passages (encode %.2fs, total %.2fs)",
            collection_id,
            generation,
            len(batch),
            len(chunk_rows),
            encoded - started,
            time.perf_counter() - started,
        )

    def _append(self, files: IndexFiles, generation: int, manifest: dict, new_state: dict) -> dict:
        """Add a segment; past MAX_SEGMENTS, merge the newest ones into it.

        Merging the tail keeps segment counts (files a snapshot opens) bounded
        while big old segments are rewritten rarely, as in an LSM tree.
        """
        names = list(manifest["segments"])
        if len(names) + 1 > MAX_SEGMENTS:
            tail, names = names[-(MAX_SEGMENTS // 2) :], names[: -(MAX_SEGMENTS // 2)]
            states = [files.load(name) for name in tail] + [new_state]
            new_state = {key: torch.cat([s[key] for s in states]) for key in new_state}
        return {**manifest, "segments": [*names, files.write_segment(generation, new_state)]}

    def _commit(self, conn, collection_id, old_generation, generation, manifest_name, first_pid, chunk_rows, batch):
        files = self._files(collection_id)
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            col = conn.execute("SELECT generation, manifest FROM collections WHERE id = ?", (collection_id,)).fetchone()
            if col is None:  # collection deleted meanwhile
                conn.execute("ROLLBACK")
                shutil.rmtree(files.root, ignore_errors=True)
                return
            if col["generation"] != old_generation:
                raise RuntimeError("index generation moved under the writer")
            previous_manifest = col["manifest"]
            conn.executemany(
                "UPDATE chunks SET passage_id = ? WHERE id = ?",
                [(first_pid + i, chunk_id) for i, (chunk_id, _) in enumerate(chunk_rows)],
            )
            for d in batch:
                state = conn.execute("SELECT state FROM documents WHERE id = ?", (d["id"],)).fetchone()
                if state is None or state["state"] != "pending":
                    continue  # deleted while it was being indexed: its passages stay dead
                conn.execute(
                    """UPDATE documents SET state = 'deleted', updated_at = ?
                       WHERE collection_id = ? AND external_id = ? AND state = 'live'""",
                    (now, collection_id, d["external_id"]),
                )
                conn.execute("UPDATE documents SET state = 'live', updated_at = ? WHERE id = ?", (now, d["id"]))
            conn.execute(
                """UPDATE collections SET generation = ?, manifest = ?, next_pid = ?, version = version + 1
                   WHERE id = ?""",
                (generation, manifest_name, first_pid + len(chunk_rows), collection_id),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # Keep the previous generation's files: other processes may be loading it.
        files.remove_unreferenced(files.files_of(manifest_name) | files.files_of(previous_manifest))

    # -- rebuild -----------------------------------------------------------

    def _needs_rebuild(self, conn, collection_id: int, manifest_name: str | None) -> bool:
        if not manifest_name:
            return False
        manifest = self._files(collection_id).read_manifest(manifest_name)
        indexed = manifest["built_passages"] + manifest["appended_passages"]
        if indexed == 0:
            return False
        dead = conn.execute(
            """SELECT COUNT(*) FROM documents d JOIN chunks c ON c.document_id = d.id
               WHERE d.collection_id = ? AND d.state = 'deleted' AND c.passage_id IS NOT NULL""",
            (collection_id,),
        ).fetchone()[0]
        if dead > self.settings.rebuild_deleted_share * indexed:
            return True
        return bool(
            manifest["codec"]
            and manifest["appended_passages"] > self.settings.rebuild_growth_factor * manifest["built_passages"]
        )

    def rebuild(self, conn: sqlite3.Connection, collection_id: int) -> None:
        """Fresh centroids from re-encoded live passages, swapped in at commit."""
        started = time.time()
        col = conn.execute("SELECT generation, manifest FROM collections WHERE id = ?", (collection_id,)).fetchone()
        if col is None:
            return
        # Tombstones that exist now are in no index after this rebuild.
        purge = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM documents WHERE collection_id = ? AND state = 'deleted'", (collection_id,)
            ).fetchall()
        ]
        rows = conn.execute(
            """SELECT c.passage_id, c.text, d.title FROM chunks c JOIN documents d ON d.id = c.document_id
               WHERE d.collection_id = ? AND d.state = 'live' AND c.passage_id IS NOT NULL
               ORDER BY c.passage_id""",
            (collection_id,),
        ).fetchall()
        files = self._files(collection_id)
        generation = col["generation"] + 1
        pids = torch.tensor([r["passage_id"] for r in rows], dtype=torch.int64)
        if rows:
            embs, doclens = self._encode([self._passage_text(r["title"], r["text"]) for r in rows])
        else:
            embs, doclens = torch.empty(0, self.encoder.dim, dtype=torch.float16), torch.empty(0, dtype=torch.int64)
        if len(rows) <= self.settings.exact_search_max_passages:
            segments = (
                [files.write_segment(generation, {"pids": pids, "doclens": doclens, "embs": embs})] if rows else []
            )
            manifest = {"codec": None, "segments": segments, "built_passages": 0, "appended_passages": len(rows)}
        else:
            codec = self._train(embs)
            codec_name = files.write_codec(generation, codec_state(codec))
            seg = files.write_segment(generation, self._compress_segment(codec, pids, embs, doclens))
            manifest = {"codec": codec_name, "segments": [seg], "built_passages": len(rows), "appended_passages": 0}
        manifest["generation"] = generation
        manifest_name = files.write_manifest(generation, manifest)
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = conn.execute("SELECT generation FROM collections WHERE id = ?", (collection_id,)).fetchone()
            if now is None or now["generation"] != col["generation"]:
                conn.execute("ROLLBACK")
                if now is None:
                    shutil.rmtree(files.root, ignore_errors=True)
                return
            conn.execute(
                "UPDATE collections SET generation = ?, manifest = ?, version = version + 1 WHERE id = ?",
                (generation, manifest_name, collection_id),
            )
            conn.executemany("DELETE FROM documents WHERE id = ?", [(i,) for i in purge])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        files.remove_unreferenced(files.files_of(manifest_name) | files.files_of(col["manifest"]))
        logger.info(
            "collection %d rebuilt at generation %d: %d passages in %.1fs",
            collection_id,
            generation,
            len(rows),
            time.time() - started,
        )
