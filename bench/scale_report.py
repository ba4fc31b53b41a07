"""The scale benchmark's report: a Markdown section for BENCHMARKS.md and PNG plots."""

from __future__ import annotations

from pathlib import Path

# Issue 10's baseline figures (BENCHMARKS.md, 2-core CPU machine).
TODAY_REAL_INGEST = 16.7
TODAY_NDCG_5K = 0.715


def _get(d: dict | None, *keys, default=None):
    for key in keys:
        if not isinstance(d, dict) or d.get(key) is None:
            return default
        d = d[key]
    return d


def _fmt(value, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def _pair(a, b, digits: int = 0) -> str:
    return f"{_fmt(a, digits)} / {_fmt(b, digits)}"


def _workers_memory(memory: dict | None) -> str:
    workers = _get(memory, "workers", default=[])
    parts = [
        f"{'w' if w.get('writer') else 'r'} {w['rss_mib']:,.0f} / {w['pss_mib']:,.0f}"
        for w in sorted(workers, key=lambda w: not w.get("writer"))
    ]
    return ", ".join(parts) or "–"


def longest_pause(point: dict) -> float | None:
    values = [_get(point, "ingest", "longest_pause_s")]
    for probe in (_get(point, "upsert_visible", default={}) or {}).values():
        values.append(_get(probe, "commits", "longest_pause_s"))
    values = [v for v in values if v is not None]
    return max(values) if values else None


def reader_growth(engine: dict, point: dict, key: str = "pss_mib") -> float | None:
    """PSS (or ``key``: private_mib, anon_mib) of the non-writer worker at this checkpoint minus a worker's at first start (MiB)."""
    start = [w[key] for w in _get(engine, "memory_at_start", "workers", default=[]) if key in w]
    readers = [w[key] for w in _get(point, "memory", "workers", default=[]) if not w.get("writer") and key in w]
    if not start or not readers:
        return None
    return max(readers) - min(start)


def engine_table(engine: dict) -> list[str]:
    lines = [
        "| passages | ingest passages/s | search p50 / p95 ms | upsert→visible p50 / p95 s, same collection "
        "| upsert→visible p50 / p95 s, other collection | longest commit pause s | RSS / PSS per worker MiB "
        "(w: writer, r: reader) | cold start to first search s | index bytes per token | writer busy after the load s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in engine.get("checkpoints", []):
        same = _get(p, "upsert_visible", "same_collection", "visible_s", default={})
        other = _get(p, "upsert_visible", "other_collection", "visible_s", default={})
        lines.append(
            f"| {_fmt(_get(p, 'ingest', 'documents'))} | {_fmt(_get(p, 'ingest', 'passages_per_s'))} "
            f"| {_pair(_get(p, 'search', 'http_ms', 'p50'), _get(p, 'search', 'http_ms', 'p95'), 1)} "
            f"| {_pair(same.get('p50'), same.get('p95'), 2)} | {_pair(other.get('p50'), other.get('p95'), 2)} "
            f"| {_fmt(longest_pause(p), 1)} | {_workers_memory(p.get('memory'))} "
            f"| {_fmt(_get(p, 'cold_start', 'first_search_s'), 1)} "
            f"| {_fmt(_get(p, 'disk', 'index_bytes_per_token'), 1)} | {_fmt(p.get('settle_s'), 1)} |"
        )
    return lines


def real_table(real: dict) -> list[str]:
    bare = _get(real, "bare_encoder", "passages_per_s")
    lines = [
        "| passages | ingest passages/s | ÷ bare encoder | nDCG@10 (43 judged queries) | search p50 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in real.get("checkpoints", []):
        rate = _get(p, "ingest", "passages_per_s")
        ratio = rate / bare if rate and bare else None
        lines.append(
            f"| {_fmt(_get(p, 'ingest', 'documents'))} | {_fmt(rate, 1)} | {_fmt(ratio, 2)} "
            f"| {_fmt(p.get('ndcg@10'), 3)} | {_fmt(_get(p, 'search_ms', 'p50'), 1)} |"
        )
    return lines


def goals_table(results: dict) -> list[str]:
    engine, real = results.get("engine") or {}, results.get("real") or {}
    last = (engine.get("checkpoints") or [{}])[-1]
    size = _fmt(_get(last, "ingest", "documents"))
    rates = [_get(p, "ingest", "passages_per_s") for p in engine.get("checkpoints", [])]
    rates = [r for r in rates if r]
    first_5k = next((p for p in real.get("checkpoints", []) if p["checkpoint"] >= 5000), None)
    index_bytes = _get(last, "disk", "index_bytes")
    index_mib = f"{index_bytes / 2**20:,.0f}" if index_bytes else "–"
    peak = _get(engine, "peak", "peak_total_pss_mib")
    same = _get(last, "upsert_visible", "same_collection", "visible_s", "p95")
    other = _get(last, "upsert_visible", "other_collection", "visible_s", "p95")
    growth = reader_growth(engine, last)
    anon = reader_growth(engine, last, "anon_mib")
    private = reader_growth(engine, last, "private_mib")
    share = f", {100 * private / (index_bytes / 2**20):.0f}% of the index" if private and index_bytes else ""
    rows = [
        (
            "ingest, real encoder, passages/s",
            f"{_fmt(real.get('ingest_passages_per_s'), 1)} ({_fmt(real.get('ingest_vs_fastest_bare_encoder'), 2)}× "
            f"the fastest bare encoder measured; the server's runtime, {_fmt(_get(real, 'bare_encoder', 'runtime'))}, "
            f"bare: {_fmt(_get(real, 'bare_encoder', 'passages_per_s'), 1)}/s)",
            f"≥ {2.5 * TODAY_REAL_INGEST:.1f}, and ≥ 0.9× the fastest encoder runtime",
        ),
        (
            "ingest with the stand-in encoder, passages/s",
            f"{_fmt(min(rates) if rates else None)} (slowest checkpoint)",
            "≥ 1,000",
        ),
        (
            f"search p50 / p95 ms, {size} passages, k=10",
            _pair(_get(last, "search", "http_ms", "p50"), _get(last, "search", "http_ms", "p95"), 1),
            "p50 ≤ 100 at 1M",
        ),
        (f"upsert-to-visible p95 s, {size} passages (same / other collection)", _pair(same, other, 2), "≤ 2 at 1M"),
        (
            "peak server memory (all processes, PSS) MiB",
            f"{_fmt(peak)} (index {index_mib})",
            "≤ index bytes + 1 GiB",
        ),
        (
            "longest commit pause s",
            _fmt(max((longest_pause(p) or 0.0 for p in engine.get("checkpoints", [])), default=None), 1),
            "≤ 5",
        ),
        (
            # An extra worker costs what it does not share with the others:
            # its private pages (USS). PSS charges each mapping process a
            # share of every shared index page, so with two workers mapping
            # the whole index each shows half of it whether or not a second
            # copy exists.
            f"memory per extra worker (the reader's private pages, growth) MiB, {size} passages",
            f"{_fmt(private)}{share} (index {index_mib}; anonymous {_fmt(anon)}; PSS growth {_fmt(growth)})",
            "≤ 20% of the index bytes",
        ),
        (
            f"cold start to first search s, {size} passages",
            _fmt(_get(last, "cold_start", "first_search_s"), 1),
            "≤ 15 at 1M",
        ),
        ("index bytes per token", _fmt(_get(last, "disk", "index_bytes_per_token"), 1), "≤ 40"),
        ("nDCG@10 msmarco-mini at 5k", _fmt(_get(first_5k, "ndcg@10"), 3), f"≥ {TODAY_NDCG_5K}"),
    ]
    return ["| figure | measured | goal |", "| --- | --- | --- |", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    dirty = " (with uncommitted engine changes)" if env.get("engine_changes_uncommitted") else ""
    out = [
        "## Scale on one node (`make bench-scale`)",
        "",
        f"{env.get('date', '')}, commit {env.get('commit', '?')}{dirty}, {env.get('cpus', '?')} CPUs, "
        f"{env.get('memory_gib', '?')} GiB; `{results.get('command', 'python -m bench.scale')}`. "
        "Corpus: msmarco-mini's 5,000 passages, then seeded distractors (bench/corpus.py). "
        "Servers: uvicorn, 2 workers, over HTTP.",
        "",
    ]
    if results.get("engine"):
        out += [
            "### Engine, with the stand-in encoder (bench/standin.py: seeded token vectors, no transformer)",
            "",
            *engine_table(results["engine"]),
            "",
            "Passages: indexed at the end of the bulk load. The upsert probes follow at once, while a loader keeps "
            "bulk-loading (wait=true, batches of 250); search (k=10, 2 threads), memory, disk and the cold start "
            "are measured after that, at rest, with the loader's passages in too (counts in the JSON). "
            "The last column: how long the writer stayed busy once the loading stopped.",
            "",
        ]
    if results.get("real"):
        real = results["real"]
        out += [
            "### Real encoder (the default checkpoint)",
            "",
            f"Bare encoder in the same run (the server's loader and `encode_documents`, outside the server, "
            f"{_fmt(_get(real, 'bare_encoder', 'passages'))} passages spread over the run's corpus): "
            + ", ".join(
                f"{runtime} {_fmt(b.get('passages_per_s'), 1)} passages/s"
                for runtime, b in (real.get("bare_encoders") or {"?": real.get("bare_encoder") or {}}).items()
            )
            + f"; ingest over the whole run {_fmt(real.get('ingest_passages_per_s'), 1)} passages/s, "
            f"{_fmt(real.get('ingest_vs_bare_encoder'), 2)}× the server's runtime, "
            f"{_fmt(real.get('ingest_vs_fastest_bare_encoder'), 2)}× the fastest measured.",
            "",
            *real_table(real),
            "",
        ]
    for key in ("engine", "real"):
        errors = _get(results, key, "server_errors", default={})
        if errors.get("count"):
            out += [
                f"Server errors in the {key} run, retried past (5xx or dropped connections): {errors['count']}; "
                f"first: {'; '.join(e.replace('|', '/')[:200] for e in errors['first'][:2])}",
                "",
            ]
    out += ["### Against the goals of issue 10", "", *goals_table(results), ""]
    out += [f"![{Path(p).stem}]({p})" for p in results.get("plots", [])]
    return "\n".join(out)


def plot(results: dict, out: Path, stamp: str) -> list[Path]:
    """PNG plots of the engine and real runs; the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    engine = results.get("engine") or {}
    points = engine.get("checkpoints") or []
    if points:
        x = [_get(p, "ingest", "documents", default=p["checkpoint"]) for p in points]
        fig, axes = plt.subplots(2, 3, figsize=(15, 8))
        series = [
            (axes[0][0], "ingest passages/s", [("stand-in", [_get(p, "ingest", "passages_per_s") for p in points])]),
            (
                axes[0][1],
                "search ms (k=10, 2 threads)",
                [(q, [_get(p, "search", "http_ms", q) for p in points]) for q in ("p50", "p95")],
            ),
            (
                axes[0][2],
                "upsert-to-visible p95 s",
                [
                    (label, [_get(p, "upsert_visible", key, "visible_s", "p95") for p in points])
                    for label, key in (("same collection", "same_collection"), ("other collection", "other_collection"))
                ],
            ),
            (axes[1][0], "longest commit pause s", [("pause", [longest_pause(p) for p in points])]),
            (
                axes[1][1],
                "memory per worker MiB",
                [
                    (f"{role} {kind.upper()}", [_worker(p, role == "writer", f"{kind}_mib") for p in points])
                    for role in ("writer", "reader")
                    for kind in ("rss", "pss")
                ],
            ),
            (
                axes[1][2],
                "cold start to first search s",
                [("restart", [_get(p, "cold_start", "first_search_s") for p in points])],
            ),
        ]
        for ax, title, lines in series:
            _lines(ax, title, x, lines)
        fig.suptitle("Engine with the stand-in encoder")
        fig.tight_layout()
        written.append(_save(fig, out / f"scale-{stamp}-engine.png"))
    real = results.get("real") or {}
    points = real.get("checkpoints") or []
    if points:
        x = [_get(p, "ingest", "documents", default=p["checkpoint"]) for p in points]
        bare = _get(real, "bare_encoder", "passages_per_s")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        _lines(
            axes[0],
            "ingest passages/s, real encoder",
            x,
            [("ingest", [_get(p, "ingest", "passages_per_s") for p in points]), ("bare encoder", [bare] * len(points))],
        )
        _lines(axes[1], "nDCG@10, msmarco-mini qrels", x, [("server", [p.get("ndcg@10") for p in points])])
        fig.tight_layout()
        written.append(_save(fig, out / f"scale-{stamp}-real.png"))
    return written


def _worker(point: dict, writer: bool, key: str):
    values = [w.get(key) for w in _get(point, "memory", "workers", default=[]) if bool(w.get("writer")) == writer]
    return values[0] if values else None


def _lines(ax, title: str, x: list, lines: list) -> None:
    for label, ys in lines:
        pairs = [(a, b) for a, b in zip(x, ys) if b is not None]
        if pairs:
            ax.plot(*zip(*pairs), marker="o", label=label)
    ax.set_title(title)
    ax.set_xlabel("passages")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
