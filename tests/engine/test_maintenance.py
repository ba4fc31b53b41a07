"""The maintainer thread yields the CPU to commits and searches."""

import os
import sys
import threading

import pytest

from app.engine.maintenance import lower_thread_priority


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_lowering_a_threads_priority_leaves_the_others_alone():
    seen: dict[str, int] = {}

    def background():
        assert lower_thread_priority(5)
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen["thread"] == min(before + 5, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc/self/statm")
def test_memory_freed_by_a_step_goes_back_to_the_os():
    """In a fresh process: this one's heap already holds what earlier tests freed."""
    import subprocess

    script = """
import os
from app.engine.maintenance import release_freed_memory

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = resident()
blocks = [bytearray(64 * 1024) for _ in range(3200)]  # 200 MiB in the heap, below mmap's threshold
pinned = bytearray(64 * 1024)  # above them: the heap's top cannot shrink by itself
assert resident() - before > 150 << 20
del blocks
held = resident() - before
assert release_freed_memory()
assert resident() - before < held - (150 << 20), (held, resident() - before)
"""
    from app.engine.maintenance import release_freed_memory

    if not release_freed_memory():
        pytest.skip("no malloc_trim in this C library")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
