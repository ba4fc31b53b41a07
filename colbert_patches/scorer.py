"""PLAID search over an index assembled in memory, with per-call parameters.

Fixes:
- upstream ``Searcher`` needs ``index_root`` + ``index`` name + experiment
  config; :class:`SnapshotScorer` is built from one manifest path's tensors;
- upstream ``IndexLoader`` reads a fixed set of chunk files once; it never
  sees passages added or removed later without a restart. A snapshot is
  assembled from immutable segments, so a new one can be built next to the
  old one and swapped in (hot reload);
- upstream ``Searcher.dense_search`` writes ``ncells``/``ndocs``/
  ``centroid_score_threshold`` into its shared config the first time it runs,
  so the first query's k silently fixes them for every later query, and
  concurrent queries race on the config. :func:`search_params` builds a fresh
  parameter object per call;
- the passage id space may have holes (deleted passages, purged at rebuild):
  the scorer works on dense slots and maps them back to passage ids.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch
from colbert.search.index_storage import IndexScorer
from colbert.search.strided_tensor import StridedTensor

logger = logging.getLogger("colbert_patches")


@dataclass(frozen=True)
class SearchParams:
    """The fields of ColBERTConfig that IndexScorer.rank reads."""

    ncells: int
    centroid_score_threshold: float
    ndocs: int
    query_maxlen: int = 32
    interaction: str = "colbert"
    total_visible_gpus: int = 0


def search_params(k: int, query_maxlen: int, ncells=None, centroid_score_threshold=None, ndocs=None) -> SearchParams:
    """Upstream's k-dependent defaults, computed per call, overridable."""
    if k <= 10:
        defaults = (1, 0.5, 256)
    elif k <= 100:
        defaults = (2, 0.45, 1024)
    else:
        defaults = (4, 0.4, max(k * 4, 4096))
    return SearchParams(
        ncells=ncells or defaults[0],
        centroid_score_threshold=centroid_score_threshold if centroid_score_threshold is not None else defaults[1],
        ndocs=max(ndocs or defaults[2], k),
        query_maxlen=query_maxlen,
    )


def build_ivf(codes: torch.Tensor, doclens: torch.Tensor, num_centroids: int):
    """Centroid -> slots inverted list (each slot once per centroid)."""
    num_slots = doclens.numel()
    emb2slot = torch.repeat_interleave(torch.arange(num_slots, dtype=torch.int64), doclens)
    keys = codes.long() * max(num_slots, 1) + emb2slot
    keys = torch.unique(keys)
    centroid_of = keys // max(num_slots, 1)
    ivf = (keys % max(num_slots, 1)).to(torch.int32)
    lengths = torch.bincount(centroid_of, minlength=num_centroids)
    return ivf, lengths


# Codes of a codec with at most this many centroids are stored as int16 (2
# bytes per token vector instead of 4); the kernels read either width.
INT16_CODES_MAX_CENTROIDS = 1 << 15


def code_dtype(num_centroids: int) -> torch.dtype:
    return torch.int16 if num_centroids <= INT16_CODES_MAX_CENTROIDS else torch.int32


@dataclass(frozen=True)
class CompressedVectors:
    """A segment's codes and packed residuals, as stored (possibly
    memory-mapped): upstream's ``ResidualEmbeddings`` would copy int16 codes
    into int32 ones."""

    codes: torch.Tensor
    residuals: torch.Tensor


@dataclass(frozen=True)
class IvfPart:
    """One input segment's IVF on its way into a merged segment: its lists
    over its own ``slots`` (``ivf``, padded or not, and ``lengths`` per
    centroid), and ``kept`` (bool per slot; None: all) the slots that stay."""

    ivf: torch.Tensor
    lengths: torch.Tensor
    slots: int
    kept: torch.Tensor | None = None


def merge_ivfs(parts: list[IvfPart], num_centroids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The IVF of the parts' kept slots laid end to end, from their own IVFs
    in O(entries): what :func:`build_ivf` gives for the concatenated codes,
    without its sort of one int64 key per token vector (6.7 s and about
    1 GiB of temporaries on a 28M-vector merge). Each part's lists are in
    slot order and the parts follow each other in slot order, so a merged
    list is its parts' lists one after the other, their slots shifted."""
    prepared: list[tuple[torch.Tensor, torch.Tensor]] = []
    offset = 0
    for part in parts:
        lengths = part.lengths.to(torch.int64)
        entries = part.ivf[: int(lengths.sum())].to(torch.int64)
        slots = part.slots
        if part.kept is not None:
            new_slot = torch.cumsum(part.kept.to(torch.int64), 0) - 1
            stays = part.kept[entries]
            centroid = torch.repeat_interleave(torch.arange(num_centroids), lengths)[stays]
            entries = new_slot[entries[stays]]
            lengths = torch.bincount(centroid, minlength=num_centroids)
            slots = int(part.kept.sum())
        prepared.append((entries + offset, lengths))
        offset += slots
    total = torch.zeros(num_centroids, dtype=torch.int64)
    for _, lengths in prepared:
        total += lengths
    out = torch.empty(int(total.sum()), dtype=torch.int32)
    base = torch.cumsum(total, 0) - total  # where each merged list starts
    for entries, lengths in prepared:
        within = torch.cumsum(lengths, 0) - lengths  # where each list starts in this part
        dest = torch.arange(entries.numel()) + torch.repeat_interleave(base - within, lengths)
        out[dest] = entries.to(torch.int32)
        base += lengths
    return out, total


def segment_arrays(
    codes: torch.Tensor | list[torch.Tensor],
    residuals: torch.Tensor | list[torch.Tensor],
    doclens: torch.Tensor,
    num_centroids: int,
    ivf: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict:
    """What a :class:`SnapshotScorer` reads, computed once when a segment is
    written: the IVF, the codes at their narrowest width (:func:`code_dtype`),
    and every per-token tensor padded as upstream's ``StridedTensor`` would
    pad it at load (a copy of the whole tensor there; here the file is
    memory-mapped as it is).

    ``codes`` and ``residuals`` may come as parts (a merge's inputs): they
    are laid end to end once, with the padding, never copied twice. ``ivf``
    (lists, lengths), when the caller has it (:func:`merge_ivfs`), is used
    instead of building it from the codes."""
    code_parts = codes if isinstance(codes, list) else [codes]
    residual_parts = residuals if isinstance(residuals, list) else [residuals]
    doclens = doclens.to(torch.int64)
    pad = int(doclens.max()) if doclens.numel() else 0
    dtype = code_dtype(num_centroids)
    all_codes = torch.cat([*(c.to(dtype) for c in code_parts), torch.zeros(pad, dtype=dtype)])
    width = residual_parts[0].size(1)
    all_residuals = torch.cat([*residual_parts, torch.zeros(pad, width, dtype=torch.uint8)])
    lists, ivf_lengths = (
        ivf if ivf is not None else build_ivf(all_codes[: all_codes.numel() - pad], doclens, num_centroids)
    )
    ivf_pad = int(ivf_lengths.max()) if ivf_lengths.numel() else 0
    return {
        "doclens": doclens,
        "codes": all_codes,
        "residuals": all_residuals,
        "ivf": torch.cat([lists.to(torch.int32), torch.zeros(ivf_pad, dtype=torch.int32)]),
        "ivf_lengths": ivf_lengths,
    }


def byte_values(codec) -> torch.Tensor:
    """float32 (256 x values per byte): the residual values each packed
    residual byte stands for (upstream's bit map, lookup table and bucket
    weights folded into one table), computed once per codec."""
    table = getattr(codec, "_byte_values", None)
    if table is None:
        combinations = codec.decompression_lookup_table[codec.reversed_bit_map.long()].long()
        table = codec._byte_values = codec.bucket_weights.float()[combinations].contiguous()
    return table


class SnapshotScorer(IndexScorer):
    """IndexScorer over one segment's tensors (see :func:`segment_arrays`),
    not files read from a directory; the tensors may be memory-mapped."""

    def __init__(self, codec, arrays: dict):
        # IndexLoader.__init__ would read files: set what it would have set.
        self.index_path = None
        self.use_gpu = False
        self.load_index_with_mmap = False
        self.codec = codec
        self.doclens = arrays["doclens"]
        self.ivf = StridedTensor(arrays["ivf"], arrays["ivf_lengths"], use_gpu=False)
        self.embeddings = CompressedVectors(arrays["codes"], arrays["residuals"])
        load_extensions()  # all of colbert's kernels: scoring uses ColBERT's too
        self.set_embeddings_strided()

    def set_embeddings_strided(self):
        """Only the per-passage offsets: this package's kernels read codes
        and residuals where they lie (upstream also wraps both in strided
        views, which only its GPU path reads)."""
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(self.doclens, dim=0)])

    @property
    def num_passages(self) -> int:
        return int(self.doclens.numel())

    def get_cells(self, Q, ncells):
        """Upstream's, with the query-centroid scores computed once per query
        and codec: every segment of a snapshot on one codec shares them.
        ``ncells`` past the codec's centroids probes them all (upstream's
        ``topk`` fails: a configured ncells would break every search of a
        collection whose codec is smaller)."""
        ncells = min(ncells, self.codec.centroids.size(0))
        # Keyed on the query's memory (each segment's retrieve passes its own
        # view of it); the entry holds that memory, so no later query can be
        # allocated at the same address while the key is in use.
        key = (Q.data_ptr(), tuple(Q.shape), Q.stride(), ncells)
        cached = getattr(self.codec, "_cells_of_query", None)
        if cached is not None and cached[0] == key:
            return cached[2]
        result = super().get_cells(Q, ncells)
        self.codec._cells_of_query = (key, Q, result)
        return result

    def pruned_centroids(self, centroid_scores: torch.Tensor, threshold: float) -> torch.Tensor:
        """The centroids whose best score for some query token reaches
        ``threshold`` (PLAID's first pass scores only those), computed once
        per query and codec like the cells."""
        key = (centroid_scores.data_ptr(), tuple(centroid_scores.shape), threshold)
        cached = getattr(self.codec, "_pruned_of_query", None)
        if cached is not None and cached[0] == key:
            return cached[2]
        pruned = centroid_scores.max(-1).values >= threshold
        self.codec._pruned_of_query = (key, centroid_scores, pruned)  # holds the scores: no address reuse
        return pruned

    def candidates(self, params: SearchParams, Q: torch.Tensor, alive=None) -> tuple[torch.Tensor, torch.Tensor]:
        """PLAID's first stage: the slots in the query's cells, tombstones
        (``~alive``) dropped, and the centroid scores (centroids x query tokens)."""
        with torch.inference_mode():
            slots, centroid_scores = self.retrieve(params, Q)
            if alive is not None:
                slots = slots[alive[slots.long()]]
            return slots, centroid_scores

    def shortlist(
        self, params: SearchParams, slots: torch.Tensor, centroid_scores: torch.Tensor, ndocs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PLAID's next two stages without the last: of ``slots``, the best
        ``ndocs`` by the pruned centroid scores, then of those the ``ndocs //
        4`` that upstream would decompress and score exactly, with the
        centroid-only score that chose them (each query token's best
        centroid among the passage's codes, summed). Several segments on one
        codec each get a share of ``ndocs`` and their shortlists are cut to
        one budget before any decompression."""
        empty = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.float32)
        if slots.numel() == 0:
            return empty
        with torch.inference_mode():
            pruned = self.pruned_centroids(centroid_scores, params.centroid_score_threshold)
            slots, approx = kernels().shortlist(
                slots.to(torch.int32).contiguous(),
                centroid_scores.float(),
                self.embeddings.codes,
                self.doclens,
                self.offsets,
                pruned,
                ndocs,
                ndocs // 4,
            )
            if slots.numel() == 0:
                return empty
            return slots, approx

    def score_pids(self, config, Q, pids, centroid_scores):
        """Upstream's, through this package's kernels: the shortlist when
        ``centroid_scores`` are given, then the survivors decompressed
        (already unit vectors) and scored exactly."""
        from colbert.modeling.colbert import colbert_score_packed

        pids = pids.to(torch.int32).contiguous()
        if centroid_scores is not None:
            pids, _ = self.shortlist(config, pids, centroid_scores, config.ndocs)
        D_packed = kernels().decompress(
            pids,
            self.doclens,
            self.offsets,
            self.embeddings.codes,
            self.embeddings.residuals,
            self.codec.centroids,
            byte_values(self.codec),
        )
        return colbert_score_packed(Q, D_packed, self.doclens[pids.long()], config), pids

    def search(self, Q: torch.Tensor, params: SearchParams, alive=None, k: int | None = None):
        """Ranked (slots, scores) for one query ``Q`` (1 x L x dim).

        ``alive`` is a bool tensor over slots; dead slots are dropped before
        scoring, so tombstones never take a place in the result. When the
        probed cells hold fewer than ``k`` live passages (tiny collections,
        or cells emptied by deletes), more cells are probed: upstream would
        just return fewer results.
        """
        filter_fn = None
        if alive is not None:

            def filter_fn(slots):
                return slots[alive[slots.long()]]

        wanted = k or 1
        available = int(alive.sum()) if alive is not None else self.doclens.numel()
        num_centroids = self.codec.centroids.size(0)
        while True:
            slots, scores = self.rank(params, Q, filter_fn=filter_fn)
            if len(slots) >= min(wanted, available) or params.ncells >= num_centroids:
                return slots, scores
            params = replace(params, ncells=min(params.ncells * 4, num_centroids), centroid_score_threshold=-1.0)


def _load_prebuilt(name: str, source: Path) -> ModuleType | None:
    """The kernel ``name`` from ``$TORCH_EXTENSIONS_DIR/name/name.so``, if it
    was built there after its source and torch were installed.

    Upstream's ``load`` always re-runs the JIT build path: it asks for a C++
    compiler, rewrites ``build.ninja`` and takes a lock file in the build
    directory. An image without a compiler, running as a user who cannot
    write there, could not use kernels built in its builder stage.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        return None
    library = Path(root) / name / f"{name}.so"
    try:
        built = library.stat().st_mtime
    except FileNotFoundError:
        return None
    if built < max(source.stat().st_mtime, Path(torch.__file__).stat().st_mtime):
        return None  # colbert-ai or torch changed since: let upstream rebuild
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STALE_LOCK_S = 600.0  # one kernel compiles in about a minute


def _build_root() -> Path:
    """Where ``torch.utils.cpp_extension.load`` builds: ``$TORCH_EXTENSIONS_DIR``
    or the default root's per-Python, per-accelerator folder."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def clear_stale_build_locks(names: list[str], max_age_s: float = STALE_LOCK_S) -> list[Path]:
    """Remove build locks older than ``max_age_s`` from the kernels' build folders.

    Upstream's build takes a ``lock`` file in the folder and every other
    process waits for it to go, forever: a process killed while compiling
    (an OOM, a kill -9, a stopped container) would stall every later start
    on that cache. A live build holds its lock for about a minute.
    """
    import time

    removed = []
    for name in names:
        lock = _build_root() / name / "lock"
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except OSError:  # none, or a cache this process may not change: upstream's build decides
            continue
    return removed


_KERNELS_SOURCE = Path(__file__).with_name("kernels.cpp")
_kernels: ModuleType | None = None


def kernels() -> ModuleType:
    """This package's search kernels (``kernels.cpp``): prebuilt from
    ``$TORCH_EXTENSIONS_DIR`` when current, else compiled once and cached
    like colbert's own."""
    global _kernels
    if _kernels is None:
        module = _load_prebuilt("colbert_server_kernels", _KERNELS_SOURCE)
        if module is None:
            from torch.utils.cpp_extension import load

            for lock in clear_stale_build_locks(["colbert_server_kernels"]):
                logger.warning("removed a stale kernel build lock %s (a build was killed)", lock)
            module = load(name="colbert_server_kernels", sources=[str(_KERNELS_SOURCE)], extra_cflags=["-O3"])
        _kernels = module
    return _kernels


def load_extensions() -> None:
    """Load colbert's C++ search kernels: prebuilt ones from
    ``$TORCH_EXTENSIONS_DIR`` when current, else compiled (first time, cached)."""
    from colbert.modeling.colbert import ColBERT

    upstream = {  # class: (attribute, extension, source next to the class's module)
        IndexScorer: [("filter_pids", "filter_pids_cpp"), ("decompress_residuals", "decompress_residuals_cpp")],
        ColBERT: [("segmented_maxsim", "segmented_maxsim_cpp")],
        StridedTensor: [("segmented_lookup", "segmented_lookup_cpp")],
    }
    for cls, names in upstream.items():
        if hasattr(cls, "loaded_extensions"):
            continue
        source_file = sys.modules[cls.__module__].__file__
        assert source_file is not None, f"{cls.__module__} has no source file"
        folder = Path(source_file).parent
        modules = [_load_prebuilt(ext, folder / f"{attr}.cpp") for attr, ext in names]
        if all(modules):
            for (attr, ext), module in zip(names, modules):
                setattr(cls, attr, getattr(module, ext))
            cls.loaded_extensions = True
        else:
            for lock in clear_stale_build_locks([ext for _, ext in names]):
                logger.warning("removed a stale kernel build lock %s (a build was killed)", lock)
            cls.try_load_torch_extensions(False)
    kernels()
