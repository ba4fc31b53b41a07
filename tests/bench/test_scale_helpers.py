"""The scale benchmark's pure parts: checkpoints, commit pauses, the report."""

from __future__ import annotations

from bench.scale import checkpoints, parse_args
from bench.scale_client import Monitor, Sample, spread
from bench.scale_report import goals_table, markdown


def test_checkpoints_below_the_size_then_the_size():
    assert checkpoints(1_000_000, (10_000, 100_000, 1_000_000)) == [10_000, 100_000, 1_000_000]
    assert checkpoints(20_000, (10_000, 100_000, 1_000_000)) == [10_000, 20_000]
    assert checkpoints(2_000, (5_000, 20_000, 100_000)) == [2_000]


def test_defaults_are_the_issue_sizes():
    options = parse_args([])
    assert options.engine_passages == 1_000_000 and options.real_passages == 100_000
    assert options.workers == 2 and options.search_threads == 2
    small = parse_args(["--engine-passages", "20000", "--skip-real", "--engine-checkpoints", "5000,1e4"])
    assert small.skip_real and small.engine_checkpoints == [5000, 10_000]


def _monitor(samples: list[tuple[float, int, int]]) -> Monitor:
    monitor = Monitor(server=None, names=["c"], interval=1.0)
    monitor.samples["c"] = [Sample(t, generation, 0, pending, 0) for t, generation, pending in samples]
    return monitor


def test_commit_report_names_segments_and_tiers_when_the_server_reports_them():
    monitor = Monitor(server=None, names=["c"], interval=1.0)
    monitor.samples["c"] = [Sample(0, 0, 0, 5, 0, 1, "exact"), Sample(1, 1, 9, 0, 9, 3, "plaid")]
    report = monitor.commit_pauses("c", 0, 2)
    assert report["max_segments"] == 3 and report["kinds"] == ["exact", "plaid"]


def test_commit_pause_counts_only_while_work_waits():
    # commits at 1, 2 and 8 with work pending throughout: the longest pause is 2 -> 8
    busy = _monitor([(0, 0, 5), (1, 1, 5), (2, 2, 5), (4, 2, 5), (6, 2, 5), (8, 3, 0)])
    report = busy.commit_pauses("c", 0, 10)
    assert (report["commits"], report["longest_pause_s"], report["samples"]) == (3, 6, 6)
    assert report["max_segments"] is None and report["kinds"] == []
    # idle from 2 to 20 (nothing pending) is no pause; work arrives at 20, commits at 21
    idle = _monitor([(0, 0, 5), (2, 1, 0), (10, 1, 0), (20, 1, 3), (21, 2, 0)])
    assert idle.commit_pauses("c", 0, 30)["longest_pause_s"] == 1
    # a pause still open at the end of the window counts up to its last sample
    stuck = _monitor([(0, 0, 5), (1, 1, 5), (5, 1, 5), (9, 1, 5)])
    assert stuck.commit_pauses("c", 0, 10)["longest_pause_s"] == 8


def test_spread():
    assert spread([]) == {"n": 0, "p50": None, "p95": None, "max": None}
    figures = spread([0.1 * i for i in range(1, 101)], scale=1000)
    assert figures["n"] == 100 and round(figures["p50"]) == 5050 and round(figures["max"]) == 10000


def test_report_tolerates_missing_parts():
    assert "## Scale on one node" in markdown({})
    text = markdown(
        {"engine": {"checkpoints": [{"checkpoint": 10, "ingest": {"documents": 10, "passages_per_s": 5.0}}]}}
    )
    assert "| 10 | 5 |" in text
    assert len(goals_table({})) == 12


def test_report_names_server_errors():
    results = {
        "engine": {"checkpoints": [], "server_errors": {"count": 2, "first": ["POST /x: 500 database is locked"]}}
    }
    assert "Server errors in the engine run, retried past (5xx or dropped connections): 2" in markdown(results)


def test_post_retries_server_errors_and_counts_them(monkeypatch):
    import httpx
    import pytest

    from bench import scale_client

    monkeypatch.setattr(scale_client.time, "sleep", lambda s: None)
    answers = iter([httpx.Response(500, text="database is locked"), httpx.Response(200, json={"ok": True})])
    client = httpx.Client(base_url="http://test", transport=httpx.MockTransport(lambda request: next(answers)))
    scale_client.SERVER_ERRORS.reset()
    assert scale_client.post(client, "/x", {}).json() == {"ok": True}
    assert scale_client.SERVER_ERRORS.summary() == {"count": 1, "first": ["POST /x: 500 database is locked"]}
    refused = httpx.Client(base_url="http://test", transport=httpx.MockTransport(lambda r: httpx.Response(422)))
    with pytest.raises(httpx.HTTPStatusError):  # a client error is not retried
        scale_client.post(refused, "/x", {})
    assert scale_client.SERVER_ERRORS.summary()["count"] == 1
    scale_client.SERVER_ERRORS.reset()


def test_report_of_a_real_run():
    real = {
        "bare_encoder": {"runtime": "torch", "passages": 300, "passages_per_s": 28.7},
        "bare_encoders": {"torch": {"passages_per_s": 28.7}, "onnx": {"passages_per_s": 23.0}},
        "ingest_passages_per_s": 18.1,
        "ingest_vs_bare_encoder": 0.63,
        "ingest_vs_fastest_bare_encoder": 0.63,
        "checkpoints": [
            {
                "checkpoint": 5000,
                "ingest": {"documents": 5000, "passages_per_s": 18.1},
                "ndcg@10": 0.72,
                "search_ms": {"p50": 75.0},
            }
        ],
    }
    text = markdown({"real": real})
    assert "torch 28.7 passages/s, onnx 23.0 passages/s" in text
    assert "| 5,000 | 18.1 | 0.63 | 0.720 | 75.0 |" in text
    assert "| nDCG@10 msmarco-mini at 5k | 0.720 |" in text
