"""Command line: ingest a folder into a collection, or tune the encoder to one.

    python -m app.cli ingest FOLDER --collection NAME [--metadata JSON]
    python -m app.cli tune --collection NAME [--steps 200] [--batch 32] [--seed 0] [--layers 0] [--reindex]

Both work on the server's data directory (settings from
``COLBERT_SERVER_*``/``.env``). ``ingest`` runs the same service as the
server: files become one upload job; if a server is running on that directory
its writer processes the job, otherwise this process does. Document ids are
the files' paths relative to FOLDER.

``tune`` reads the collection's passages from the SQLite store, read-only
(it needs no index, no writer lease and no server: a running one is not
disturbed), trains the projection of the checkpoint the collection is
indexed with on them (``app/tune.py``) and writes a new checkpoint under the
data directory's ``checkpoints/``. With ``--reindex`` the collection is then
re-indexed with it by the server's writer (``app/engine/reindex.py``; a
server must be running on the data directory for that to happen); without,
nothing changes until ``POST /v1/collections/NAME/reindex`` names it. The
server's tuning jobs (``POST /v1/collections/NAME/tune``) run this command
with ``--job``: it records its outcome in that job.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from app.errors import CollectionNotFound, ServerError
from app.factory import service_for
from app.service import UploadedFile
from app.settings import Settings
from app.tune import TuneConfig

TUNE_DEFAULTS = TuneConfig()
PASSAGES_PER_QUERY = 4  # passages read from the store per pseudo-query wanted


def collect(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))


async def ingest(settings: Settings, folder: Path, collection: str, metadata: dict | None, create: bool) -> int:
    service = service_for(settings)  # (the stateless tier's: the files go to Qdrant)
    await service.astart()
    try:
        try:
            await service.get_collection(collection)
        except CollectionNotFound:
            if not create:
                raise
            await service.create_collection(collection, None)
        paths = collect(folder)
        if not paths:
            print(f"no files under {folder}", file=sys.stderr)
            return 1
        uploads = []
        for path in paths:
            size = path.stat().st_size
            if size > settings.max_file_bytes:
                uploads.append(
                    UploadedFile(path.name, None, str(path.relative_to(folder)), "the file is over the size limit")
                )
            else:
                uploads.append(UploadedFile(path.name, path.read_bytes(), str(path.relative_to(folder))))
        job_id = await service.submit_files(collection, uploads, metadata)
        with tqdm(total=len(paths), unit="file", desc=f"ingesting into {collection}") as bar:
            while True:
                job = await service.job_status(job_id)
                bar.n = job["files_done"]
                bar.refresh()
                if job["state"] in ("done", "failed"):
                    break
                await asyncio.sleep(0.2)
        counts = job["counts"]
        print(f"job {job_id}: {counts['added']} added, {counts['unchanged']} unchanged, {counts['failed']} refused")
        for f in job["files"]:
            if f["state"] == "failed":
                print(f"  refused {f['document_id']}: {f['error']}")
        return 0 if job["state"] == "done" else 1
    finally:
        await service.astop()


def collection_passages(settings: Settings, collection: str, sample: int | None = None, seed: int = 0) -> list:
    """The collection's live passages as tuning reads them, from a read-only
    connection to the store: all of them, or a seeded ``sample`` (a large
    collection's texts need not all be read to draw a few thousand
    pseudo-queries)."""
    import random

    from app.store.index_state import IndexStateStore
    from app.store.schema import connect_read_only
    from app.tune import passages_from_chunks

    try:
        conn = connect_read_only(settings.database_path)
    except FileNotFoundError:
        raise CollectionNotFound(
            f"collection {collection!r} does not exist (no server database in {settings.data_dir})"
        ) from None
    try:
        store = IndexStateStore(conn)
        collection_id = store.collection_id(collection)
        if collection_id is None:
            raise CollectionNotFound(f"collection {collection!r} does not exist")
        ids = store.live_chunk_ids(collection_id)
        if sample is not None and len(ids) > sample:
            ids = sorted(random.Random(seed).sample(ids, sample))
        return passages_from_chunks(store.live_chunks(ids))
    finally:
        conn.close()


def indexed_collection(settings: Settings, collection: str):
    """The collection's row as the index writer reads it (None: no such collection)."""
    from app.store.index_state import IndexStateStore
    from app.store.schema import connect_read_only

    conn = connect_read_only(settings.database_path)
    try:
        store = IndexStateStore(conn)
        collection_id = store.collection_id(collection)
        return store.collection(collection_id) if collection_id is not None else None
    finally:
        conn.close()


def collection_checkpoint(settings: Settings, col) -> Path:
    """The checkpoint a collection's index is encoded with, as a directory."""
    from app.engine.encoders import checkpoint_root
    from app.service import resolve_checkpoint

    if col is not None and col.checkpoint:
        return checkpoint_root(settings.data_dir) / col.checkpoint
    return Path(resolve_checkpoint(settings))


def tune(settings: Settings, args: argparse.Namespace) -> int:
    from app import tuning_jobs
    from app.engine.encoders import checkpoint_root
    from app.tune import TuningError, default_destination, write_checkpoint
    from app.tune import tune as tune_projection

    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            pass
    config = TuneConfig(
        steps=args.steps,
        batch=args.batch,
        seed=args.seed,
        layers=args.layers,
        max_queries=args.max_queries,
        **({"learning_rate": args.learning_rate} if args.learning_rate else {}),
        **({"layer_learning_rate": args.layer_learning_rate} if args.layer_learning_rate else {}),
    )
    root = checkpoint_root(settings.data_dir)
    try:
        config.check()
        # Not every passage gives a pseudo-query (one sentence, too short):
        # a sample several times the queries wanted is plenty.
        sample = PASSAGES_PER_QUERY * config.max_queries
        passages = collection_passages(settings, args.collection, sample, config.seed)
        if not passages:
            raise TuningError(f"collection {args.collection!r} has no indexed passages to tune on")
        col = indexed_collection(settings, args.collection)
        checkpoint = Path(args.checkpoint) if args.checkpoint else collection_checkpoint(settings, col)
        if not checkpoint.is_dir():
            raise TuningError(f"tuning needs a checkpoint directory on this machine, not {checkpoint}")
        dest = Path(args.out) if args.out else default_destination(root, args.collection)
        if args.reindex and dest.resolve().parent != root.resolve():
            raise TuningError(f"--reindex needs the new checkpoint under {root} (a collection names it there)")
        if dest.exists():
            raise TuningError(f"{dest} exists: choose a new directory (a checkpoint in use must not change)")
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        from app.engine.encoder import ColBERTEncoder
        from colbert_patches.model_loading import EncoderOptions

        options = EncoderOptions.for_checkpoint(
            str(checkpoint),
            query_augmentation=settings.query_augmentation,
            marker_tokens=settings.marker_tokens,
            doc_maxlen=settings.doc_maxlen,
            query_maxlen=settings.query_maxlen,
        )
        encoder = ColBERTEncoder(str(checkpoint), options, device="cuda" if torch.cuda.is_available() else "cpu")
        result = tune_projection(encoder, passages, config, cache_dir=args.cache, progress=print)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_checkpoint(checkpoint, dest, result.weights, result.provenance(str(checkpoint), args.collection))
    except (TuningError, ServerError) as exc:
        message = exc.message if isinstance(exc, ServerError) else str(exc)
        _record_failure(settings, args.job, message)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except BaseException as exc:
        _record_failure(settings, args.job, f"{type(exc).__name__}: {exc}")
        raise
    kept = f"the weights of step {result.best_step}" if result.best_step else "the checkpoint's own weights"
    print(
        f"held-out pseudo-query loss: {result.held_out_before:.4f} before, {result.held_out_after:.4f} after "
        f"({config.steps} steps, {kept} kept; training loss {result.curve()[0]:.4f} -> {result.curve()[-1]:.4f})"
    )
    print(f"checkpoint written to {dest}")
    under_root = dest.resolve().parent == root.resolve()
    name = dest.name if under_root else str(dest)
    reindex_id = col.id if args.reindex and col is not None else None
    if args.job or reindex_id is not None:
        from app.store.schema import connect

        conn = connect(settings.database_path)
        try:
            figures = {
                "held_out_before": round(result.held_out_before, 4),
                "held_out_after": round(result.held_out_after, 4),
                "kept_step": result.best_step,
                "steps": config.steps,
                "passages": result.passages,
                "pseudo_queries": result.queries,
                "seconds": round(result.seconds, 1),
            }
            if args.job:
                tuning_jobs.finish(conn, args.job, name, figures, reindex_id)
            elif reindex_id is not None:
                tuning_jobs.start_reindex(conn, reindex_id, name)
        finally:
            conn.close()
    if reindex_id is not None:
        print(f"collection {args.collection!r} is re-indexed with {name} by the server's writer (its `reindex`)")
    else:
        print(
            f"collection {args.collection!r} is not re-indexed: its passages were encoded with {checkpoint}; "
            f"re-index it with this checkpoint (POST /v1/collections/{args.collection}/reindex "
            f'{{"checkpoint": "{name}"}}) before its queries use it'
        )
    return 0


def _record_failure(settings: Settings, job: str | None, message: str) -> None:
    if job:
        from app import tuning_jobs

        tuning_jobs.record_failure(settings.database_path, job, message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="ingest a folder (recursively)")
    p.add_argument("folder", type=Path)
    p.add_argument("--collection", required=True)
    p.add_argument("--metadata", help="JSON object added to every document's metadata")
    p.add_argument("--no-create", action="store_true", help="fail if the collection does not exist")
    p.add_argument("--data-dir", type=Path, help="overrides COLBERT_SERVER_DATA_DIR")
    t = sub.add_parser("tune", help="tune the encoder's projection to a collection (no labels needed)")
    t.add_argument("--collection", required=True)
    t.add_argument("--steps", type=int, default=TUNE_DEFAULTS.steps)
    t.add_argument("--batch", type=int, default=TUNE_DEFAULTS.batch, help="pseudo-queries per step")
    t.add_argument("--seed", type=int, default=TUNE_DEFAULTS.seed)
    t.add_argument("--layers", type=int, default=0, help="top transformer layers trained too (changes dense vectors)")
    t.add_argument("--max-queries", type=int, default=TUNE_DEFAULTS.max_queries, help="pseudo-queries drawn at most")
    t.add_argument("--learning-rate", type=float, help=f"the projection's (default {TUNE_DEFAULTS.learning_rate})")
    t.add_argument(
        "--layer-learning-rate", type=float, help=f"the layers' (default {TUNE_DEFAULTS.layer_learning_rate})"
    )
    t.add_argument(
        "--out", type=Path, help="new checkpoint directory (default: under the data directory's checkpoints/)"
    )
    t.add_argument(
        "--checkpoint", help="the checkpoint to start from (default: the one the collection is indexed with)"
    )
    t.add_argument("--reindex", action="store_true", help="re-index the collection with the new checkpoint")
    t.add_argument("--job", help=argparse.SUPPRESS)  # a server's tuning job: its outcome is recorded there
    t.add_argument("--nice", type=int, default=0, help=argparse.SUPPRESS)
    t.add_argument("--cache", type=Path, help="keep the computed hidden states here between runs")
    t.add_argument("--data-dir", type=Path, help="overrides COLBERT_SERVER_DATA_DIR")
    args = parser.parse_args(argv)
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    try:
        if args.command == "tune":
            return tune(settings, args)
        metadata = json.loads(args.metadata) if args.metadata else None
        if not args.folder.is_dir():
            parser.error(f"{args.folder} is not a folder")
        return asyncio.run(ingest(settings, args.folder, args.collection, metadata, not args.no_create))
    except ServerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
