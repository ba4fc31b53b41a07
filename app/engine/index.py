"""Index files of one collection (the PLAID backend's storage).

Layout under ``indexes/<collection id>/``:

- ``seg-<generation>-<token>.pt``: passages added by one commit (or made by
  one background merge): their passage ids (ascending), token counts, and
  either fp16 token vectors (exact tier, small collections) or PLAID codes +
  residuals with the segment's own IVF, padded as the scorer reads them, so
  a segment is memory-mapped as it is and loads in O(1);
- ``sample-<generation>-<token>.pt``: while the codec is still small, a sample
  of a segment's original vectors, which the next codec is trained on
  (dropped from the manifest once the codec has its full size);
- ``codec-<generation>-<token>.pt``: centroids and residual buckets; each
  PLAID segment names the codec it was compressed with;
- ``manifest-<generation>-<token>.json``: which codec new writes use and which
  segments make up that generation. Written last; SQLite's
  ``collections.manifest`` names the committed one, so a crash before the
  SQLite commit leaves files nobody points at (removed at the next start).

Every file is written once, atomically, and never changed; ``<token>`` is
random, so two attempts at one generation never write the same name. A
snapshot reads a manifest and the files it names, so a searcher never sees
half a commit.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from colbert_patches.persistence import atomic_torch_save, atomic_write_json, fsync_dir

_GENERATION_FILE = re.compile(r"^(seg|codec|sample|manifest)-(\d+)(-[0-9a-f]+)?\.(pt|json)$")


@dataclass(frozen=True)
class SegmentEntry:
    """One segment as the manifest lists it (enough to plan merges unread)."""

    name: str
    codec: str | None  # None: an exact-tier segment (fp16 vectors)
    passages: int
    tokens: int
    first_pid: int
    last_pid: int
    sample: str | None = None  # original vectors kept for training the next codec


@dataclass(frozen=True)
class Manifest:
    """What one generation is made of."""

    generation: int = 0
    codec: str | None = None  # the codec new writes use; None: exact tier
    segments: tuple[SegmentEntry, ...] = field(default_factory=tuple)
    codec_passages: int = 0  # passages in the index when that codec was trained
    codec_tokens: int = 0  # and token vectors

    @property
    def passages(self) -> int:
        return sum(s.passages for s in self.segments)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.segments)

    def files(self) -> set[str]:
        codecs = {s.codec for s in self.segments if s.codec}
        samples = {s.sample for s in self.segments if s.sample}
        return {*(s.name for s in self.segments), *codecs, *samples, *([self.codec] if self.codec else [])}

    def to_json(self) -> dict:
        return {**asdict(self), "segments": [asdict(s) for s in self.segments], "format": 2}


class IndexFiles:
    """Reads and writes the files of one collection's index directory."""

    _manifests: dict[str, Manifest] = {}  # manifests never change once written: cache by path

    def __init__(self, root: Path):
        self.root = root

    def ensure(self) -> None:
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root.parent)  # the new directory entry survives power loss

    @staticmethod
    def new_name(kind: str, generation: int, suffix: str = "pt") -> str:
        """A file name no other attempt will use (a background step names,
        and protects, its file before writing it)."""
        return f"{kind}-{generation:09d}-{secrets.token_hex(4)}.{suffix}"

    def write_segment(self, generation: int, state: dict, name: str | None = None) -> str:
        name = name or self.new_name("seg", generation)
        atomic_torch_save(state, self.root / name)
        return name

    def write_codec(self, generation: int, state: dict, name: str | None = None) -> str:
        name = name or self.new_name("codec", generation)
        atomic_torch_save(state, self.root / name)
        return name

    def write_manifest(self, manifest: Manifest) -> str:
        name = self.new_name("manifest", manifest.generation, "json")
        atomic_write_json(manifest.to_json(), self.root / name)
        return name

    def read_manifest(self, name: str) -> Manifest:
        key = str(self.root / name)
        manifest = self._manifests.get(key)
        if manifest is None:
            manifest = self._parse(json.loads((self.root / name).read_text()))
            if len(self._manifests) > 1024:
                self._manifests.clear()
            self._manifests[key] = manifest
        return manifest

    def _parse(self, data: dict) -> Manifest:
        codec = data.get("codec")
        if data.get("format", 1) >= 2:
            segments = tuple(SegmentEntry(**s) for s in data["segments"])
            return Manifest(
                int(data["generation"]),
                codec,
                segments,
                int(data.get("codec_passages", 0)),
                int(data.get("codec_tokens", 0)),
            )
        # Format 1 (one codec, segments by name): describe each segment from its file.
        entries = []
        for name in data.get("segments", ()):
            state = self.load(name)
            pids = state["pids"]
            entries.append(
                SegmentEntry(
                    name,
                    codec,
                    int(pids.numel()),
                    int(state["doclens"].sum()),
                    int(pids[0]) if pids.numel() else 0,
                    int(pids[-1]) if pids.numel() else -1,
                )
            )
        return Manifest(int(data.get("generation", 0)), codec, tuple(entries), int(data.get("built_passages", 0)))

    def load(self, name: str) -> dict:
        """A segment or codec; tensors memory-mapped (pages shared between
        processes, read on demand)."""
        return torch.load(self.root / name, map_location="cpu", weights_only=True, mmap=True)

    def size(self, names: set[str]) -> int:
        return sum((self.root / n).stat().st_size for n in names if (self.root / n).exists())

    def files_of(self, manifest_name: str | None) -> set[str]:
        if not manifest_name:
            return set()
        return {manifest_name, *self.read_manifest(manifest_name).files()}

    def remove_unreferenced(self, keep: set[str], temp_files: bool = False) -> None:
        """Delete generation files not in ``keep``; with ``temp_files`` also
        half-written ones (only at start-up: a background step of this
        process may be writing one now)."""
        if not self.root.exists():
            return
        for path in self.root.iterdir():
            if path.name in keep:
                continue
            if _GENERATION_FILE.fullmatch(path.name) or (temp_files and path.name.startswith(".")):
                path.unlink(missing_ok=True)
