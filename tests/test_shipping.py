"""Shipping: the Dockerfile, environment.yml, the release script and the
production serve command (graceful shutdown, prebuilt kernels, no compiler)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import ROOT, free_port

BUILD_TOOLS = ("gcc", "g++", "c++", "clang", "build-essential", "make", "cmake")
REGISTRY = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"


# -- Dockerfile ---------------------------------------------------------------


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation
    lines joined and comments dropped."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line
        if pending.strip():
            logical.append(pending.strip())
        pending = ""
    stages: list[list[tuple[str, str]]] = [[]]
    for entry in logical:
        instruction, _, args = entry.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages[1:]  # stages[0] holds the ARGs before the first FROM


def dockerfile_problems(text: str) -> list[str]:
    stages = dockerfile_stages(text)
    if len(stages) < 2:
        return ["not a multi-stage build"]
    problems = []
    builder, final = stages[:-1], stages[-1]
    tool = re.compile(r"(?<![\w+.-])(" + "|".join(re.escape(t) for t in BUILD_TOOLS) + r")(?![\w+-])")
    for instruction, args in final:
        if instruction == "RUN" and tool.search(args):
            problems.append(f"final stage installs or runs a build tool: RUN {args}")
        if instruction == "COPY" and "--from" in args and re.search(r"\s/usr(/|\s)", args):
            problems.append(f"final stage copies system files from a build stage: COPY {args}")
    if not str(final[0][1]).startswith("${PYTHON_IMAGE}") and "python:3.11-slim" not in final[0][1]:
        problems.append("final stage is not based on python:3.11-slim")
    users = [args.split(":")[0] for instruction, args in final if instruction == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append("final stage runs as root (no non-root USER)")
    checks = [args for instruction, args in final if instruction == "HEALTHCHECK"]
    if not checks or "/health" not in checks[-1] or "curl" in checks[-1]:
        problems.append("no HEALTHCHECK on /health (with python, not curl)")
    if not any(i == "RUN" and "scripts/setup.sh" in a for stage in builder for i, a in stage):
        problems.append("the build stage does not install through scripts/setup.sh")
    if not any(i == "RUN" and "models.prepare --models-dir /opt/models" in a for stage in builder for i, a in stage):
        problems.append("the build stage does not prepare the models into /opt/models")
    env = " ".join(args for instruction, args in final if instruction == "ENV")
    for setting in ("COLBERT_SERVER_MODELS_DIR=/opt/models", "COLBERT_SERVER_DATA_DIR=/data", "WEB_CONCURRENCY="):
        if setting not in env:
            problems.append(f"final stage does not set {setting}")
    if not any(instruction == "VOLUME" and "/data" in args for instruction, args in final):
        problems.append("/data is not a VOLUME")
    if not any(instruction in ("CMD", "ENTRYPOINT") and "scripts/serve.sh" in args for instruction, args in final):
        problems.append("the entry point is not scripts/serve.sh")
    return problems


def test_dockerfile_final_stage_is_lean_non_root_and_checked():
    assert dockerfile_problems((ROOT / "Dockerfile").read_text()) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda t: t + "\nRUN apt-get update && apt-get install -y --no-install-recommends build-essential\n",
            "build tool",
        ),
        (lambda t: t + "\nRUN apt-get install -y g++\n", "build tool"),
        (lambda t: t + "\nUSER root\n", "runs as root"),
        (lambda t: re.sub(r"HEALTHCHECK[^\n]*\\\n[^\n]*\n", "", t), "HEALTHCHECK"),
        (lambda t: t.replace("./scripts/setup.sh", "pip install ."), "scripts/setup.sh"),
    ],
)
def test_dockerfile_check_catches_each_problem(change, problem):
    """The static check above fails on a Dockerfile with the problem."""
    problems = dockerfile_problems(change((ROOT / "Dockerfile").read_text()))
    assert any(problem in p for p in problems), problems


def test_dockerignore_keeps_environments_data_and_secrets_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "data", ".env", ".git"} <= ignored


# -- environment.yml ------------------------------------------------------------


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in project["dependencies"]:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line} is not pinned"
        pins[req.name.lower()] = spec.version
    return pins


def test_environment_yml_installs_the_project_with_pyproject_pins():
    """environment.yml takes every pin from pyproject (it installs the project
    itself); what it names on its own (torch, first, from the CPU index) must
    carry pyproject's pin."""
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    (pip_section,) = [d["pip"] for d in deps if isinstance(d, dict)]
    assert any(re.fullmatch(r"-e \.(\[[\w,]+\])?", line) for line in pip_section), "the project is not installed"
    assert any("download.pytorch.org/whl/cpu" in line for line in pip_section)
    pins = pyproject_pins()
    named = [Requirement(line) for line in pip_section if not line.startswith("-")]
    assert "torch" in {r.name for r in named}
    for req in named:
        assert req.name.lower() in pins, f"{req.name} is not a dependency in pyproject"
        assert str(req.specifier) == f"=={pins[req.name.lower()]}", f"{req} differs from pyproject's pin"


# -- release script ---------------------------------------------------------------


def release(*args: str, env: dict | None = None, path: str | None = None) -> subprocess.CompletedProcess:
    # The script's variables come from the test only (a CI runner sets CIRCLE_BUILD_NUM, say).
    ours = {"BUILD_NUMBER", "ECR_REGISTRY", "AWS_REGION", "ECR_REPOSITORY"}
    ours |= {"CIRCLE_BUILD_NUM", "AWS_ACCOUNT_ID", "ECR_AWS_REGION", "ECR_REPOSITORY_NAME"}
    base = {k: v for k, v in os.environ.items() if k not in ours}
    if path:
        base["PATH"] = path + os.pathsep + base["PATH"]
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "release.sh"), *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def fake_tools(tmp_path) -> tuple[str, Path]:
    """``docker`` and ``aws`` stand-ins that log their arguments (and what
    docker read on stdin)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    scripts = {
        "docker": f'#!/bin/sh\nstdin=""\n[ "$1" = login ] && stdin=$(cat)\necho "docker $* stdin=$stdin" >> {log}\n',
        "aws": f'#!/bin/sh\necho "aws $*" >> {log}\necho secret-token\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return str(bin_dir), log


def expected_tags() -> tuple[str, list[str]]:
    version = (ROOT / "VERSION").read_text().strip()
    image = f"{REGISTRY}/colbert-server"
    return version, [f"{image}:{version}-42", f"{image}:{version}", f"{image}:latest"]


def test_release_dry_run_prints_build_login_and_three_pushes(fake_tools):
    bin_dir, log = fake_tools
    # AWS_REGION (set for other AWS calls) does not move the login away from the registry's region.
    env = {"BUILD_NUMBER": "42", "ECR_REGISTRY": REGISTRY, "AWS_REGION": "us-east-1"}
    result = release("--dry-run", env=env, path=bin_dir)
    assert result.returncode == 0, result.stderr
    assert not log.exists(), "a dry run ran commands"
    version, tags = expected_tags()
    lines = result.stdout.strip().splitlines()
    build = next(line for line in lines if line.startswith("docker build"))
    for tag in tags:
        assert f"-t {tag}" in build
    assert (
        f"aws ecr get-login-password --region eu-west-1 | docker login --username AWS --password-stdin {REGISTRY}"
        in lines
    )
    assert [line for line in lines if line.startswith("docker push")] == [f"docker push {tag}" for tag in tags]


def test_release_runs_the_commands_in_order(fake_tools):
    bin_dir, log = fake_tools
    result = release(
        "--build-number", "42", "--registry", REGISTRY, "--region", "eu-west-1", env={"BUILD_NUMBER": "7"}, path=bin_dir
    )
    assert result.returncode == 0, result.stderr
    _, tags = expected_tags()
    calls = log.read_text().splitlines()
    assert calls[0].startswith("docker build") and all(f"-t {tag}" in calls[0] for tag in tags)
    assert calls[1] == "aws ecr get-login-password --region eu-west-1"
    assert calls[2] == f"docker login --username AWS --password-stdin {REGISTRY} stdin=secret-token"
    assert calls[3:] == [f"docker push {tag} stdin=" for tag in tags]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--dry-run"], {"ECR_REGISTRY": REGISTRY}, "no build number"),
        (["--dry-run"], {"BUILD_NUMBER": "42"}, "no registry"),
        (["--dry-run", "--build-number", "4-2"], {"ECR_REGISTRY": REGISTRY}, "build number '4-2'"),
        (["--dry-run", "--registry", "docker.io"], {"BUILD_NUMBER": "42"}, "not an ECR registry"),
        (["--dry-run", "--build-number"], {"ECR_REGISTRY": REGISTRY}, "needs a value"),
        (["--push-everything"], {"BUILD_NUMBER": "42", "ECR_REGISTRY": REGISTRY}, "unknown argument"),
        (["--dry-run", "--region", "us-east-1"], {"BUILD_NUMBER": "42", "ECR_REGISTRY": REGISTRY}, "differs"),
    ],
)
def test_release_refuses_missing_or_bad_input(fake_tools, args, env, message):
    bin_dir, log = fake_tools
    result = release(*args, env=env, path=bin_dir)
    assert result.returncode != 0
    assert message in result.stderr
    assert not log.exists()


# -- production serving -------------------------------------------------------------

KERNELS = (
    "filter_pids_cpp",
    "decompress_residuals_cpp",
    "segmented_maxsim_cpp",
    "segmented_lookup_cpp",
    "colbert_server_kernels",
)


@pytest.fixture(scope="module")
def prebuilt_kernels(tmp_path_factory) -> Path:
    """colbert's kernels, compiled (or taken from the cache) the usual way,
    then copied elsewhere as the image's builder stage leaves them."""
    subprocess.run(
        [sys.executable, "-c", "from colbert_patches.scorer import load_extensions; load_extensions()"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"},
        check=True,
        capture_output=True,
        timeout=600,
    )
    from torch.utils.cpp_extension import get_default_build_root

    cache = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    dest = tmp_path_factory.mktemp("torch_extensions")
    for name in KERNELS:
        shutil.copytree(cache / name, dest / name)  # copy2: modification times kept, as Docker's COPY does
    return dest


def no_compiler_path(tmp_path: Path) -> str:
    """A PATH with the virtual environment and a shell, but no compiler."""
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "bash").symlink_to(shutil.which("bash"))
    path = os.pathsep.join([str(tools), str(Path(sys.executable).parent)])
    for compiler in ("c++", "g++", "gcc", "cc", "clang"):
        assert shutil.which(compiler, path=path) is None
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*")}


class ServeProcess:
    """scripts/serve.sh (the image's entry point) in a process group of its own."""

    def __init__(self, data_dir: Path, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir.parent / f"serve-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "serve.sh")],
            cwd=ROOT,
            env={**env, "UVICORN_PORT": str(self.port), "COLBERT_SERVER_DATA_DIR": str(data_dir)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}: {self.output()}"
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                if r.status_code == 200:
                    return
                assert "start-up failed" not in r.text, self.output()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


TOPICS = (
    "otter walrus falcon beaver badger heron lobster camel parrot salmon "
    "violin trumpet guitar piano cello harp drum flute organ banjo "
    "volcano glacier desert canyon island meadow swamp reef valley cliff "
    "copper silver marble granite quartz amber cobalt bronze nickel zinc"
).split()


def document(n: int) -> dict:
    """Several passages; only this one mentions its topic."""
    body = " ".join(f"Entry {n}, part {p}, is about the {TOPICS[n]} seen on day {p}." for p in range(25))
    return {"id": f"doc-{n}", "text": body}


@pytest.mark.slow
def test_prod_serve_finishes_requests_in_flight_on_sigterm(tmp_path, checkpoint_dir, prebuilt_kernels):
    """Two workers under scripts/serve.sh, as in the image: colbert's kernels
    prebuilt, no compiler on PATH. SIGTERM while an upsert waits for its index
    commit: the upsert still answers 200, the server exits 0, and after a
    restart every document is searchable (through PLAID, so the kernels ran)."""
    data = tmp_path / "data"
    kernels_before = snapshot(prebuilt_kernels)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("COLBERT_SERVER_", "UVICORN_"))},
        "PATH": no_compiler_path(tmp_path),
        "VENV": sys.prefix,
        "TORCH_EXTENSIONS_DIR": str(prebuilt_kernels),
        "GIT_PYTHON_REFRESH": "quiet",  # no git in the image either
        "WEB_CONCURRENCY": "2",
        "UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN": "60",
        "COLBERT_SERVER_CHECKPOINT": str(checkpoint_dir),
        "COLBERT_SERVER_EXACT_SEARCH_MAX_PASSAGES": "8",
        "COLBERT_SERVER_ANSWER_PRELOAD": "false",
        "COLBERT_SERVER_LOG_LEVEL": "WARNING",
    }
    docs = [document(n) for n in range(40)]
    server = ServeProcess(data, env)
    try:
        server.wait_ready()
        httpx.post(server.url + "/v1/collections", json={"name": "shutdown"}).raise_for_status()
        answer: dict = {}

        def upsert() -> None:
            try:
                while True:
                    r = httpx.post(
                        server.url + "/v1/collections/shutdown/documents",
                        json={"documents": docs, "wait": True},
                        timeout=120,
                    )
                    # Each worker loads the model on its own: the other one may still be loading.
                    if r.status_code != 503 or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                answer.update(status=r.status_code, body=r.json(), at=time.monotonic())
            except Exception as exc:  # reported by the assertions below
                answer.update(error=repr(exc))

        deadline = time.monotonic() + 120
        thread = threading.Thread(target=upsert)
        thread.start()
        while httpx.get(server.url + "/v1/collections/shutdown").json()["pending_documents"] == 0:
            assert time.monotonic() < deadline and thread.is_alive(), f"the upsert never showed up as pending: {answer}"
            time.sleep(0.02)
        os.kill(server.proc.pid, signal.SIGTERM)
        terminated = time.monotonic()
        thread.join(120)
        assert answer.get("status") == 200, (answer, server.output())
        assert answer["at"] > terminated, "the upsert finished before SIGTERM: nothing was in flight"
        assert {r["status"] for r in answer["body"]["results"]} == {"indexed"}
        assert server.proc.wait(90) == 0, server.output()
    finally:
        server.close()

    server = ServeProcess(data, {**env, "WEB_CONCURRENCY": "1"})
    try:
        server.wait_ready()
        assert httpx.get(server.url + "/v1/collections/shutdown").json()["documents"] == len(docs)
        for n in (0, 17, 39):
            r = httpx.post(
                server.url + "/v1/collections/shutdown/search", json={"query": f"the {TOPICS[n]}", "k": 3}, timeout=60
            )
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["document_id"] == f"doc-{n}"
    finally:
        server.close()
    assert snapshot(prebuilt_kernels) == kernels_before, "the prebuilt kernels were rebuilt or touched"


def test_serve_and_setup_scripts_are_executable():
    for name in ("serve.sh", "setup.sh", "release.sh"):
        assert (ROOT / "scripts" / name).stat().st_mode & stat.S_IXUSR, name


def test_uvicorn_workers_keep_tcp_nodelay():
    """With ``--workers N`` uvicorn binds the listener itself; accepted sockets
    inherit its ``proto`` and asyncio sets TCP_NODELAY only for IPPROTO_TCP.
    uvicorn 0.54 left it 0: every keep-alive request after the first waited
    ~40 ms for the client's delayed ACK (search p50 60 ms instead of 19 ms at
    10k passages, 2 workers). The pinned version must keep the fix."""
    import socket

    from uvicorn.config import Config

    sock = Config(app="main:app", host="127.0.0.1", port=0).bind_socket()
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
