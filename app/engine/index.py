"""Index files of one collection (the PLAID backend's storage).

Layout under ``indexes/<collection id>/``:

- ``seg-<generation>.pt``: passages added by one commit: their passage ids,
  token counts, and either fp16 token vectors (exact tier, small collections)
  or PLAID codes + residuals;
- ``codec-<generation>.pt``: centroids and residual buckets of a PLAID build;
- ``manifest-<generation>.json``: which codec and segments make up that
  generation. Written last; SQLite's ``collections.manifest`` names the
  committed one, so a crash before the SQLite commit leaves files nobody
  points at (removed at the next start).

Every file is written once, atomically, and never changed; a snapshot reads a
manifest and the files it names, so a searcher never sees half a commit.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from colbert_patches.persistence import atomic_torch_save, atomic_write_json, fsync_dir

_GENERATION_FILE = re.compile(r"^(seg|codec|manifest)-(\d+)\.(pt|json)$")


@dataclass(frozen=True)
class Manifest:
    """What one generation is made of."""

    generation: int = 0
    codec: str | None = None  # None: exact tier (fp16 vectors, no PLAID yet)
    segments: tuple[str, ...] = field(default_factory=tuple)
    built_passages: int = 0  # passages the codec was trained with
    appended_passages: int = 0  # passages added since (all of them in the exact tier)

    @property
    def passages(self) -> int:
        return self.built_passages + self.appended_passages

    def files(self) -> set[str]:
        return {*self.segments, *([self.codec] if self.codec else [])}

    def to_json(self) -> dict:
        return {**asdict(self), "segments": list(self.segments)}

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        return cls(
            generation=int(data.get("generation", 0)),
            codec=data.get("codec"),
            segments=tuple(data.get("segments", ())),
            built_passages=int(data.get("built_passages", 0)),
            appended_passages=int(data.get("appended_passages", 0)),
        )


class IndexFiles:
    """Reads and writes the files of one collection's index directory."""

    _manifests: dict[str, Manifest] = {}  # manifests never change once written: cache by path

    def __init__(self, root: Path):
        self.root = root

    def ensure(self) -> None:
        if not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root.parent)  # the new directory entry survives power loss

    def write_segment(self, generation: int, state: dict) -> str:
        name = f"seg-{generation:09d}.pt"
        atomic_torch_save(state, self.root / name)
        return name

    def write_codec(self, generation: int, state: dict) -> str:
        name = f"codec-{generation:09d}.pt"
        atomic_torch_save(state, self.root / name)
        return name

    def write_manifest(self, manifest: Manifest) -> str:
        name = f"manifest-{manifest.generation:09d}.json"
        atomic_write_json(manifest.to_json(), self.root / name)
        return name

    def read_manifest(self, name: str) -> Manifest:
        key = str(self.root / name)
        manifest = self._manifests.get(key)
        if manifest is None:
            manifest = Manifest.from_json(json.loads((self.root / name).read_text()))
            if len(self._manifests) > 1024:
                self._manifests.clear()
            self._manifests[key] = manifest
        return manifest

    def load(self, name: str) -> dict:
        return torch.load(self.root / name, map_location="cpu", weights_only=True)

    def files_of(self, manifest_name: str | None) -> set[str]:
        if not manifest_name:
            return set()
        return {manifest_name, *self.read_manifest(manifest_name).files()}

    def remove_unreferenced(self, keep: set[str]) -> None:
        """Delete generation files not in ``keep`` (and stale temp files)."""
        if not self.root.exists():
            return
        for path in self.root.iterdir():
            if path.name in keep:
                continue
            if _GENERATION_FILE.match(path.name) or path.name.startswith("."):
                path.unlink(missing_ok=True)
