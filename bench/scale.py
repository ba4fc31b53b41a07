"""Scale benchmark on one node, through real server processes over HTTP.

Two runs, each against its own uvicorn server (2 workers, a fresh data
directory) fed by :class:`bench.corpus.ScaleCorpus` (msmarco-mini's 5,000
passages, then seeded distractors):

- **engine**: the server built around :class:`bench.standin.StandInEncoder`
  (no transformer, so the engine's own cost is measured), loaded to
  ``--engine-passages`` (default 1,000,000). At each checkpoint (10k / 100k /
  1M): bulk ingest passages/s, search p50/p95 (k=10, 2 client threads),
  memory per worker (RSS, PSS), bytes per index token, cold start to the
  first search, upsert-to-visible of one-document upserts while a loader
  bulk-loads (into the same collection and into another), the longest
  pause between commits.
- **real**: the configured checkpoint (default MiniLM), loaded to
  ``--real-passages`` (default 100,000): ingest passages/s, the bare
  encoder's speed measured in the same run and their ratio, nDCG@10 on the
  43 judged msmarco-mini queries at 5k / 20k / 100k.

Writes ``bench/results/scale-<date>.json`` and PNG plots beside it, and
prints a Markdown section for BENCHMARKS.md.

    python -m bench.scale                                      # everything (hours)
    python -m bench.scale --engine-passages 20000 --skip-real  # minutes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench import scale_client as sc
from bench.corpus import ScaleCorpus
from bench.data import mean_ndcg
from bench.scale_proc import ROOT, Server, disk_usage, free_port
from bench.scale_report import markdown, plot
from bench.standin import read_stats

ENGINE_CHECKPOINTS = (10_000, 100_000, 1_000_000)
REAL_CHECKPOINTS = (5_000, 20_000, 100_000)
SCALE, SIDE = "scale", "side"
_STAMP = time.strftime("%Y%m%d-%H%M%S")


def checkpoints(total: int, defaults: tuple[int, ...] | list[int]) -> list[int]:
    """The default checkpoints below ``total``, then ``total`` itself."""
    return sorted({c for c in defaults if c < total} | {total})


def parse_sizes(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    run = p.add_argument_group("what to run")
    run.add_argument("--engine-passages", type=int, default=1_000_000, help="stand-in run size (default 1,000,000)")
    run.add_argument("--engine-checkpoints", type=parse_sizes, default=list(ENGINE_CHECKPOINTS), metavar="N,N,..")
    run.add_argument("--real-passages", type=int, default=100_000, help="real-encoder run size (default 100,000)")
    run.add_argument("--real-checkpoints", type=parse_sizes, default=list(REAL_CHECKPOINTS), metavar="N,N,..")
    run.add_argument("--skip-engine", action="store_true", help="no stand-in run")
    run.add_argument("--skip-real", action="store_true", help="no real-encoder run")
    run.add_argument("--skip-probes", action="store_true", help="no upsert-to-visible probes (engine run)")
    run.add_argument("--skip-cold-start", action="store_true", help="no restarts (engine run)")
    srv = p.add_argument_group("server")
    srv.add_argument("--workers", type=int, default=2)
    srv.add_argument("--port", type=int, default=0, help="0: a free port")
    srv.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="extra server env, e.g. COLBERT_SERVER_TORCH_THREADS=2",
    )
    srv.add_argument("--keep-data", action="store_true", help="keep the servers' data directories")
    load = p.add_argument_group("load")
    load.add_argument("--batch", type=int, default=500, help="documents per bulk POST")
    load.add_argument("--ingest-clients", type=int, default=2, help="threads posting bulk batches")
    load.add_argument("--max-backlog", type=int, default=20_000, help="pending documents before bulk posting pauses")
    load.add_argument("--search-requests", type=int, default=200)
    load.add_argument("--search-threads", type=int, default=2)
    load.add_argument("--probes", type=int, default=20, help="one-document upserts per target collection")
    load.add_argument("--loader-batch", type=int, default=250, help="documents per POST of the loader during probes")
    load.add_argument("--visible-timeout", type=float, default=300.0)
    load.add_argument("--raw-sample", type=int, default=1000, help="passages for the bare encoder figure")
    load.add_argument(
        "--bare-runtimes",
        type=lambda text: [r.strip() for r in text.split(",") if r.strip()],
        default=[],
        metavar="R,R,..",
        help="encoder runtimes to time bare besides the server's (torch, onnx, onnx-int8)",
    )
    load.add_argument("--poll-interval", type=float, default=0.5, help="seconds between collection polls")
    load.add_argument("--settle-timeout", type=float, default=4 * 3600.0)
    load.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args(argv)


def extra_env(options) -> dict[str, str]:
    env = {}
    for item in options.set:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants VAR=VALUE, not {item!r}")
        env[name] = value
    return env


def create_collections(server: Server, names: list[str]) -> None:
    with httpx.Client(base_url=server.base, timeout=sc.TIMEOUT) as client:
        for name in names:
            client.post("/v1/collections", json={"name": name}).raise_for_status()


def writer_pid(server: Server) -> int | None:
    state = sc.writer_state(server.base)
    return state.get("lease_holder_pid") if state else None


def index_report(server: Server, monitor: sc.Monitor) -> dict:
    """Bytes on disk and tokens: the collections' own index reports
    (``GET /v1/collections/{name}``, ``index``), the data directory's file
    sizes, and the stand-in's encoding totals as a cross-check (exact when
    every encoded passage is still live, else scaled to the live chunks)."""
    out: dict = disk_usage(server.data_dir)
    with httpx.Client(base_url=server.base, timeout=sc.TIMEOUT) as client:
        out["collections"] = {n: client.get(f"/v1/collections/{n}").json().get("index") for n in monitor.names}
    reported = [i for i in out["collections"].values() if i]
    if reported and sum(i["tokens"] for i in reported):
        out["tokens"] = sum(i["tokens"] for i in reported)
        out["index_bytes_per_token"] = sum(i["bytes"] for i in reported) / out["tokens"]
        out["bytes_per_token_from"] = "the collections' index reports"
    stats = read_stats(server.stats_dir)
    if stats["passages"]:
        live = sum(s.chunks for s in (monitor.latest(n) for n in monitor.names) if s is not None)
        exact = stats["passages"] == live
        tokens = stats["tokens"] if exact else round(stats["tokens"] * live / stats["passages"])
        out["standin"] = {"tokens": tokens, "tokens_exact": exact, "live_chunks": live, "encoded": stats}
        if "index_bytes_per_token" not in out and tokens:
            out["tokens"] = tokens
            out["index_bytes_per_token"] = out["index_bytes"] / tokens
            out["bytes_per_token_from"] = "index directory size / stand-in token count"
    return out


def ndcg(server: Server, corpus: ScaleCorpus, name: str) -> dict:
    runs, latencies = {}, []
    with httpx.Client(base_url=server.base, timeout=sc.TIMEOUT) as client:
        for qid, text in corpus.queries.items():
            t0 = time.perf_counter()
            runs[qid], _ = sc.search(client, name, text)
            latencies.append(time.perf_counter() - t0)
    return {"ndcg@10": mean_ndcg(runs, corpus.qrels), "search_ms": sc.spread(latencies, 1000)}


def engine_checkpoint(server, monitor, feeder, corpus, probes, size, options) -> dict:
    """One checkpoint: bulk ingest to ``size``; at once (whatever background
    work the growth set off) the upsert probes under a continuing bulk load;
    then, at rest, search, memory, disk and a cold start."""
    queries = list(corpus.queries.values())
    point: dict = {"checkpoint": size}
    point["ingest"] = sc.ingest(server, monitor, feeder, SCALE, size, options)
    print(f"  {size:,}: ingest {point['ingest']['passages_per_s']:.0f} passages/s", flush=True)
    if not options.skip_probes:
        point["upsert_visible"] = {}
        for label, target in (("same_collection", SCALE), ("other_collection", SIDE)):
            probe = sc.upsert_visible(server, feeder, probes, target, SCALE, options)
            t0, t1 = probe.pop("window")
            probe["commits"] = monitor.commit_pauses(SCALE, t0, t1)
            point["upsert_visible"][label] = probe
    point["settle_s"] = sc.settle(server, monitor, [SCALE, SIDE], options.settle_timeout)
    point["search"] = sc.search_latency(server, SCALE, queries, options.search_requests, options.search_threads)
    point["ndcg_standin"] = ndcg(server, corpus, SCALE)["ndcg@10"]
    point["documents"] = _get_documents(monitor)
    point["memory"] = server.memory(writer_pid(server))
    point["disk"] = index_report(server, monitor)
    if not options.skip_cold_start:
        point["cold_start"] = sc.cold_start(server, SCALE, queries[0], options.settle_timeout)
        point["memory_after_cold_start"] = server.memory(writer_pid(server))
    point["server_errors_so_far"] = sc.SERVER_ERRORS.summary()["count"]
    return point


def _get_documents(monitor: sc.Monitor) -> int | None:
    latest = monitor.latest(SCALE)
    return latest.documents if latest else None


@contextlib.contextmanager
def serving(server: Server, monitor, result: dict):
    """One run's server and monitor: the server log's tail printed if the run
    fails; both stopped and the server errors recorded whatever happens; the
    log's path recorded when it succeeds."""
    try:
        yield
    except BaseException:
        print(server.log_tail())
        raise
    finally:
        monitor.stop()
        server.stop()
        result["server_errors"] = sc.SERVER_ERRORS.summary()
    result["server_log"] = str(server.log_path)


def engine_run(corpus: ScaleCorpus, workdir: Path, options) -> dict:
    sizes = checkpoints(options.engine_passages, options.engine_checkpoints)
    server = Server(
        workdir / "engine",
        options.port or free_port(),
        options.workers,
        "standin",
        extra_env(options),
        options.out / f"scale-{_STAMP}-engine-server.log",
    )
    result: dict = {"encoder": "StandInEncoder (bench/standin.py)", "workers": options.workers, "checkpoints": []}
    sc.SERVER_ERRORS.reset()
    server.start()
    monitor = sc.Monitor(server, [SCALE, SIDE], options.poll_interval)
    with serving(server, monitor, result):
        result["first_ready_s"] = server.wait_ready()
        create_collections(server, [SCALE, SIDE])
        result["memory_at_start"] = server.memory(writer_pid(server))
        monitor.start()
        feeder = sc.Feeder(corpus, options.batch)
        probes = sc.ProbeTexts(options.seed)
        started = time.monotonic()
        for size in sizes:
            result["checkpoints"].append(engine_checkpoint(server, monitor, feeder, corpus, probes, size, options))
            write_partial(result, options, "engine")
        result["peak"] = monitor.peak_memory(started, time.monotonic())
    return result


def server_settings(server: Server):
    """The Settings the real server runs with (its data directory and the ``--set`` overrides)."""
    from app.settings import Settings

    prefix = "COLBERT_SERVER_"
    overrides = {k[len(prefix) :].lower(): v for k, v in server.extra_env.items() if k.startswith(prefix)}
    return Settings(_env_file=None, **{**overrides, "data_dir": server.data_dir})


def resolved_runtime(settings) -> str:
    import torch

    from app.service import AUTO_CPU_RUNTIME

    if settings.encoder_runtime != "auto":
        return settings.encoder_runtime
    return "torch" if torch.cuda.is_available() else AUTO_CPU_RUNTIME


def bare_encoder(settings, texts: list[str]) -> dict:
    """The bare encoder on ``texts``: the server's own loader and
    ``encode_documents`` (what the writer calls), outside the server."""
    from app.service import load_encoder

    encoder = load_encoder(settings)
    encoder.encode_documents(texts[:32])  # warm
    started = time.perf_counter()
    _, doclens = encoder.encode_documents(texts)
    seconds = time.perf_counter() - started
    del encoder
    gc.collect()
    return {
        "runtime": resolved_runtime(settings),
        "passages": len(texts),
        "seconds": seconds,
        "passages_per_s": len(texts) / seconds,
        "tokens": sum(doclens),
    }


def bare_encoders(server: Server, texts: list[str], extra_runtimes: list[str]) -> dict[str, dict]:
    """The server's runtime first, then each of ``extra_runtimes``."""
    settings = server_settings(server)
    out = {resolved_runtime(settings): bare_encoder(settings, texts)}
    for runtime in extra_runtimes:
        if runtime not in out:
            out[runtime] = bare_encoder(settings.model_copy(update={"encoder_runtime": runtime}), texts)
    return out


def real_run(corpus: ScaleCorpus, workdir: Path, options) -> dict:
    sizes = checkpoints(options.real_passages, options.real_checkpoints)
    server = Server(
        workdir / "real",
        options.port or free_port(),
        options.workers,
        "real",
        extra_env(options),
        options.out / f"scale-{_STAMP}-real-server.log",
    )
    result: dict = {"encoder": "ColBERTEncoder (the configured checkpoint)", "workers": options.workers}
    result["checkpoints"] = []
    sc.SERVER_ERRORS.reset()
    server.start()
    monitor = sc.Monitor(server, [SCALE], options.poll_interval)
    with serving(server, monitor, result):
        result["first_ready_s"] = server.wait_ready()
        # Evenly spread over the passages this run ingests: the same mix of
        # msmarco-mini and distractors.
        step = max(1, options.real_passages // max(1, options.raw_sample))
        sample = [corpus.passage(i)["text"] for i in range(0, options.real_passages, step)][: options.raw_sample]
        result["bare_encoders"] = bare_encoders(server, sample, options.bare_runtimes)
        result["bare_encoder"] = next(iter(result["bare_encoders"].values()))  # the server's runtime
        for runtime, bare in result["bare_encoders"].items():
            print(f"  bare encoder ({runtime}): {bare['passages_per_s']:.1f} passages/s", flush=True)
        create_collections(server, [SCALE])
        monitor.start()
        feeder = sc.Feeder(corpus, options.batch)
        for size in sizes:
            point: dict = {"checkpoint": size, "ingest": sc.ingest(server, monitor, feeder, SCALE, size, options)}
            point["settle_s"] = sc.settle(server, monitor, [SCALE], options.settle_timeout)
            point["judged_passages_indexed"] = min(size, corpus.judged_count)
            point.update(ndcg(server, corpus, SCALE))
            point["memory"] = server.memory(writer_pid(server))
            point["disk"] = index_report(server, monitor)
            point["server_errors_so_far"] = sc.SERVER_ERRORS.summary()["count"]
            result["checkpoints"].append(point)
            print(
                f"  {size:,}: ingest {point['ingest']['passages_per_s']:.1f} passages/s, nDCG@10 {point['ndcg@10']:.3f}"
            )
            write_partial(result, options, "real")
        total_s = sum(p["ingest"]["seconds"] for p in result["checkpoints"])
        total = sum(p["ingest"]["passages"] for p in result["checkpoints"])
        result["ingest_passages_per_s"] = total / total_s if total_s else None
        result["ingest_vs_bare_encoder"] = result["ingest_passages_per_s"] / result["bare_encoder"]["passages_per_s"]
        fastest = max(b["passages_per_s"] for b in result["bare_encoders"].values())
        result["ingest_vs_fastest_bare_encoder"] = result["ingest_passages_per_s"] / fastest
    return result


def write_partial(part: dict, options, key: str) -> None:
    """Each finished checkpoint lands on disk at once (a long run may be stopped)."""
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / f"scale-{_STAMP}.partial-{key}.json").write_text(json.dumps(part, indent=2, default=str))


def environment() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import psutil

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "engine_changes_uncommitted": bool(git("status", "--porcelain", "app", "colbert_patches")),
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    corpus = ScaleCorpus(seed=options.seed)
    results: dict = {"environment": environment(), "options": {k: v for k, v in vars(options).items() if k != "out"}}
    results["command"] = "python -m bench.scale " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="colbert-scale-"))
    try:
        if not options.skip_engine:
            print(f"engine run (stand-in encoder) to {options.engine_passages:,} passages", flush=True)
            results["engine"] = engine_run(corpus, workdir, options)
        if not options.skip_real:
            print(f"real-encoder run to {options.real_passages:,} passages", flush=True)
            results["real"] = real_run(corpus, workdir, options)
    finally:
        if not options.keep_data:
            shutil.rmtree(workdir, ignore_errors=True)
    options.out.mkdir(parents=True, exist_ok=True)
    path = options.out / f"scale-{_STAMP}.json"
    results["plots"] = [
        str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in plot(results, options.out, _STAMP)
    ]
    path.write_text(json.dumps(results, indent=2, default=str))
    for partial in options.out.glob(f"scale-{_STAMP}.partial-*.json"):
        partial.unlink()
    section = markdown(results)
    path.with_suffix(".md").write_text(section + "\n")
    print(f"\nwrote {path} and {path.with_suffix('.md').name}\n")
    print(section)


if __name__ == "__main__":
    main()
