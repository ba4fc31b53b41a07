"""Fault injection, short: kill -9 in each of the three phases (plain
upserts, the first PLAID build, a merge or retraining) and a full disk,
through real server processes with the stand-in encoder. The same code as
``python -m bench.faults`` (100+ runs), a few iterations."""

from __future__ import annotations

import pytest

from bench.faults import PHASES, disk_full, kill_loop

pytestmark = pytest.mark.slow


def quiet(line: str) -> None:
    pass


def test_kill_9_in_every_phase_loses_no_acknowledged_write(tmp_path):
    result = kill_loop(tmp_path, runs=len(PHASES), seed=7, log=quiet)
    assert [r["phase"] for r in result["records"]] == list(PHASES)
    assert result["acknowledged"] > 0
    assert result["lost"] == 0 and result["final"]["lost"] == 0, result["final"]["lost"]
    assert result["ok"], [r["problems"] for r in result["records"]] + [result["final"]]


def test_a_full_disk_refuses_or_keeps_writes_pending_and_loses_none(tmp_path):
    result = disk_full(tmp_path, seed=7, full_s=3.0, restart=False, log=quiet)
    assert result["ready_statuses"].get("degraded"), result  # the writer said why it holds writes back
    assert result["acknowledged"] > 0
    assert result["failed_while_full"] == 0 and result["store"]["failed"] == 0
    assert result["lost"] == 0 and result["ok"], result["problems"]
