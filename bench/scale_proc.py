"""The scale benchmark's server processes: start and stop uvicorn with N
workers on a data directory of its own, and read what only the OS knows
(resident and proportional memory per worker, bytes on disk)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
CLOSE = {"Connection": "close"}  # a fresh connection: any worker may answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``uvicorn --factory bench.scale_server:app --workers N`` on ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int,
        workers: int,
        encoder: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ):
        self.data_dir = Path(data_dir)
        self.port = port
        self.workers = workers
        self.encoder = encoder
        self.base = f"http://127.0.0.1:{port}"
        self.stats_dir = self.data_dir / "bench-standin"
        self.log_path = log_path or self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "COLBERT_SERVER_DATA_DIR": str(self.data_dir),
            "COLBERT_SERVER_LOG_LEVEL": "WARNING",
            "COLBERT_SERVER_ACCESS_LOG": "false",
            # The answer LM and hallucination scorer are not measured here:
            # loaded, they would add their memory to every worker.
            "COLBERT_SERVER_ANSWER_PRELOAD": "false",
            "HF_HUB_OFFLINE": "1",
            "COLBERT_BENCH_ENCODER": self.encoder,
            "COLBERT_BENCH_STANDIN_STATS": str(self.stats_dir),
            **self.extra_env,
        }

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.stats_dir.mkdir(exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("a")
        log.write(f"--- start {time.strftime('%H:%M:%S')} ---\n")
        log.flush()
        command = [sys.executable, "-m", "uvicorn", "--factory", "bench.scale_server:app"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        command += ["--timeout-graceful-shutdown", "30", "--log-level", "warning"]
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(command, cwd=ROOT, env=self.environment(), stdout=log, stderr=log)
        log.close()

    def stop(self, timeout: float = 180.0) -> float:
        """SIGTERM (uvicorn's graceful shutdown), SIGKILL after ``timeout``; seconds taken."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        children = self.worker_processes()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            for child in children:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            self.process.kill()
            self.process.wait(30)
        return time.monotonic() - started

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 900.0) -> float:
        """Seconds from start until ``/ready`` first answers 200 (whichever worker takes the connection)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server exited (rc {self.process.returncode}); see {self.log_path}")
            try:
                if httpx.get(f"{self.base}/ready", headers=CLOSE, timeout=30).status_code == 200:
                    return time.monotonic() - self.started_at
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server was not ready after {timeout:.0f}s; see {self.log_path}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def worker_processes(self) -> list[psutil.Process]:
        if not self.alive():
            return []
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        workers = []
        for child in children:
            try:
                if "resource_tracker" not in " ".join(child.cmdline()):
                    workers.append(child)
            except psutil.Error:
                continue
        return workers

    def memory(self, writer_pid: int | None = None) -> dict:
        """RSS, PSS and peak RSS of the master and each worker process, in MiB."""
        workers = []
        for proc in self.worker_processes():
            figures = process_memory(proc.pid)
            if figures:
                workers.append({"pid": proc.pid, "writer": proc.pid == writer_pid, **figures})
        master = process_memory(self.process.pid) if self.alive() else {}
        return {
            "workers": workers,
            "master": master,
            "total_rss_mib": sum(w["rss_mib"] for w in workers) + master.get("rss_mib", 0.0),
            "total_pss_mib": sum(w["pss_mib"] for w in workers) + master.get("pss_mib", 0.0),
        }

    def memory_totals(self) -> tuple[float, float]:
        """(RSS, PSS) of all server processes together, MiB (for sampling)."""
        figures = self.memory()
        return figures["total_rss_mib"], figures["total_pss_mib"]


def process_memory(pid: int) -> dict:
    """From /proc: rss, pss, private, shared and anonymous MiB (smaps_rollup) and the peak RSS (VmHWM).

    Anonymous memory is what no other process can share (heap, tensors not
    mapped from a file); a worker's index pages are file-backed and shared
    through the page cache with every worker that maps the same segment."""
    out: dict = {}
    keys = {
        "Rss": "rss_mib",
        "Pss": "pss_mib",
        "Private_Clean": "private_mib",
        "Private_Dirty": "private_mib",
        "Shared_Clean": "shared_mib",
        "Shared_Dirty": "shared_mib",
        "Anonymous": "anon_mib",
    }
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in keys:
                out[keys[name]] = out.get(keys[name], 0.0) + int(rest.split()[0]) / 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mib"] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def tree_bytes(path: Path) -> int:
    """Apparent size of every file under ``path``."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


def disk_usage(data_dir: Path) -> dict:
    """Bytes of the index files and of the SQLite store (with its WAL)."""
    sqlite = sum(tree_bytes(p) if p.is_dir() else p.stat().st_size for p in data_dir.glob("server.sqlite3*"))
    return {"index_bytes": tree_bytes(data_dir / "indexes"), "sqlite_bytes": sqlite}
