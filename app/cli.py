"""Command line: ingest a folder into a collection through the server's pipeline.

    python -m app.cli ingest FOLDER --collection NAME [--metadata JSON]

Runs the same service as the server, on the same data directory (settings
from ``COLBERT_SERVER_*``/``.env``). Files become one upload job; if a server
is running on that directory its writer processes the job, otherwise this
process does. Document ids are the files' paths relative to FOLDER.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from tqdm import tqdm

from app.errors import CollectionNotFound, ServerError
from app.service import SearchService, UploadedFile
from app.settings import Settings


def collect(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))


async def ingest(settings: Settings, folder: Path, collection: str, metadata: dict | None, create: bool) -> int:
    service = SearchService(settings)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ingest", help="ingest a folder (recursively)")
    p.add_argument("folder", type=Path)
    p.add_argument("--collection", required=True)
    p.add_argument("--metadata", help="JSON object added to every document's metadata")
    p.add_argument("--no-create", action="store_true", help="fail if the collection does not exist")
    p.add_argument("--data-dir", type=Path, help="overrides COLBERT_SERVER_DATA_DIR")
    args = parser.parse_args(argv)
    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir else {}))
    metadata = json.loads(args.metadata) if args.metadata else None
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    try:
        return asyncio.run(ingest(settings, args.folder, args.collection, metadata, not args.no_create))
    except ServerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
