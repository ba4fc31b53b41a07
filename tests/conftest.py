from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.factory import create_app
from app.settings import Settings
from models.build_default_checkpoint import ensure_default_checkpoint

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return ensure_default_checkpoint(tmp_path_factory.mktemp("models") / "colbert-minilm-l6")


@pytest.fixture(scope="session")
def shared_models_dir(tmp_path_factory) -> Path:
    """One models_dir for the session: the answer LM and the hallucination
    scorer are converted/exported into it once."""
    return tmp_path_factory.mktemp("shared-models")


@pytest.fixture(scope="module")
def fake_lm():
    """A fake OpenAI-compatible LM server (answers without a model)."""
    from tests.answer.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer() as fake:
        yield fake


def make_settings(data_dir: Path, checkpoint: Path, **overrides) -> Settings:
    return Settings(
        _env_file=None,
        environment="test",
        data_dir=data_dir,
        checkpoint=str(checkpoint),
        log_level="WARNING",
        **{"answer_preload": False, **overrides},
    )


async def wait_ready(client: httpx.AsyncClient, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await client.get("/ready")).status_code == 200:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("app did not become ready")


class RunningApp:
    """The real app in-process (ASGI transport), started and stopped on demand."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = None
        self.manager = None
        self.client: httpx.AsyncClient | None = None

    async def start(self, ready_timeout: float = 300) -> httpx.AsyncClient:
        self.app = create_app(self.settings)
        self.manager = LifespanManager(self.app, startup_timeout=600, shutdown_timeout=120)
        await self.manager.__aenter__()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.manager.app), base_url="http://localhost"
        )
        await wait_ready(self.client, ready_timeout)  # (TimeoutError: started, not ready; stop() it)
        return self.client

    async def stop(self) -> None:
        await self.client.aclose()
        await self.manager.__aexit__(None, None, None)


@pytest.fixture(scope="module")
async def app_env(tmp_path_factory, checkpoint_dir):
    """One running app per test module; tests use their own collections."""
    running = RunningApp(make_settings(tmp_path_factory.mktemp("data"), checkpoint_dir, exact_search_max_passages=16))
    await running.start()
    yield running
    await running.stop()


@pytest.fixture
def client(app_env) -> httpx.AsyncClient:
    return app_env.client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real uvicorn server process on a data directory."""

    def __init__(self, data_dir: Path, checkpoint: Path, extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "COLBERT_SERVER_DATA_DIR": str(data_dir),
            "COLBERT_SERVER_CHECKPOINT": str(checkpoint),
            "COLBERT_SERVER_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's output, for an assertion's message."""
        self.log.flush()
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def kill_during_writes(
    server: ServerProcess, collection: str, make_doc, batch: int, at_least: int
) -> tuple[list[str], list[str]]:
    """Upsert batches of ``make_doc(n)`` into ``collection`` from a thread
    until ``at_least`` documents are acknowledged, then SIGKILL the server
    inside a later request: (ids sent, ids acknowledged)."""
    import threading

    acknowledged: list[str] = []
    sent: list[str] = []
    stop = threading.Event()

    def writer_loop():
        n = 0
        with httpx.Client(base_url=server.url, timeout=120) as client:
            while not stop.is_set():
                docs = [make_doc(n + i) for i in range(batch)]
                sent.extend(d["id"] for d in docs)
                n += batch
                try:
                    r = client.post(f"/v1/collections/{collection}/documents", json={"documents": docs})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    acknowledged.extend(d["id"] for d in docs)

    thread = threading.Thread(target=writer_loop)
    thread.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # land the kill inside a later request
    server.kill9()
    stop.set()
    thread.join(30)
    server.log.close()
    assert len(acknowledged) >= at_least
    return sent, acknowledged


@pytest.fixture(scope="session", autouse=True)
def fast_tier_loads_no_model(request):
    """``make test-fast`` (``-m "not slow"``) must not load the ColBERT model:
    a test that does belongs in the full tier (mark it ``slow``)."""
    if request.config.getoption("-m") != "not slow":
        yield
        return
    from app.engine.encoder import ColBERTEncoder

    def refuse(*args, **kwargs):
        raise AssertionError("the fast tier loads no model: mark this test slow, or use tests.fakes.FakeEncoder")

    original = ColBERTEncoder.__init__
    ColBERTEncoder.__init__ = refuse  # type: ignore[method-assign]
    yield
    ColBERTEncoder.__init__ = original  # type: ignore[method-assign]
