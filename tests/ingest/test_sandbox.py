"""Extraction in a child process: the time and memory limits, a killed
child, and the child replaced after each (real processes, no model)."""

from __future__ import annotations

import threading
import time

import pytest

from app.ingest.extract import ExtractionError
from app.ingest.sandbox import ExtractionSandbox

# Valid HTML that takes the parser seconds (about 3.5 s on the 2-core machine).
SLOW_HTML = b"<p>word</p>" * 200_000


@pytest.fixture
def sandbox():
    box = ExtractionSandbox(timeout_s=60, memory_bytes=1024 * 2**20)
    yield box
    box.close()


def test_files_are_extracted_and_refusals_keep_their_reason(sandbox):
    assert sandbox.extract("a.txt", b"hello world", 1000).text == "hello world"
    with pytest.raises(ExtractionError, match="binary"):
        sandbox.extract("b.txt", b"\x00\x01\x02" * 10, 1000)
    first = sandbox._process.pid
    assert sandbox.extract("c.md", b"# Title\n\ntext", 1000).sections[0].heading == "Title"
    assert sandbox._process.pid == first  # one child serves file after file


def test_a_file_past_the_time_limit_fails_and_the_next_one_is_served(sandbox):
    sandbox.timeout_s = 0.5
    started = time.monotonic()
    with pytest.raises(ExtractionError, match="longer than the 0.5 s limit"):
        sandbox.extract("slow.html", SLOW_HTML, 10**8)
    assert time.monotonic() - started < 5
    assert sandbox.extract("next.txt", b"still served", 1000).text == "still served"


def test_a_file_past_the_memory_limit_fails_and_the_next_one_is_served():
    box = ExtractionSandbox(timeout_s=120, memory_bytes=300 * 2**20)
    try:
        with pytest.raises(ExtractionError, match="memory"):
            box.extract("huge.html", b"<p>word</p>" * 1_500_000, 10**9)
        assert box.extract("next.txt", b"still served", 1000).text == "still served"
    finally:
        box.close()


def test_a_child_killed_mid_file_fails_that_file_only(sandbox):
    sandbox.extract("warm.txt", b"warm", 100)  # the child is up
    killer = threading.Timer(0.3, lambda: sandbox._process.kill())
    killer.start()
    with pytest.raises(ExtractionError, match="stopped"):
        sandbox.extract("slow.html", SLOW_HTML, 10**8)
    killer.join()
    assert sandbox.extract("next.txt", b"still served", 1000).text == "still served"


def test_the_extractor_runs_at_a_lower_cpu_priority_than_the_server():
    import os

    box = ExtractionSandbox(timeout_s=60, memory_bytes=0, nice=7)
    try:
        box.extract("warm.txt", b"warm", 100)
        assert os.getpriority(os.PRIO_PROCESS, box._process.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 7
    finally:
        box.close()


def test_the_child_ends_when_the_server_is_killed_mid_file(tmp_path):
    """A server killed by -9 while its child parses a long file must not
    leave the child running to the end of that file on a core the restarted
    server needs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "server.py"
    script.write_text(
        "import threading, time\n"
        "from app.ingest.sandbox import ExtractionSandbox\n"
        "box = ExtractionSandbox(timeout_s=600, memory_bytes=0)\n"
        "box.extract('warm.txt', b'warm', 100)\n"
        "print(box._process.pid, flush=True)\n"
        "box.extract('slow.html', b'<p>word</p>' * 2_000_000, 10**9)\n"
    )
    root = str(Path(__file__).resolve().parents[2])
    server = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": root}
    )
    child = int(server.stdout.readline())
    time.sleep(0.5)  # the child is parsing
    os.kill(child, 0)  # alive
    server.kill()
    server.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        # a zombie of a dead parent is reaped by init; read its state
        try:
            if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    os.kill(child, 9)
    raise AssertionError("the extraction child outlived its server by 5 s")


def test_the_address_space_limit_is_a_backstop_well_above_the_memory_limit():
    """The memory limit is the server's watch on resident memory; the
    child's address-space limit sits far above it (CPython at a hard
    allocation limit can spin in its own error handling until the wall-clock
    limit instead of failing the file at once)."""
    from app.ingest.sandbox import address_space_backstop

    box = ExtractionSandbox(timeout_s=60, memory_bytes=300 * 2**20)
    try:
        box.extract("warm.txt", b"warm", 100)
        limits = open(f"/proc/{box._process.pid}/limits").read()
        line = next(line for line in limits.splitlines() if line.startswith("Max address space"))
        assert int(line.split()[3]) == address_space_backstop(300 * 2**20) >= 2 * 300 * 2**20
    finally:
        box.close()
