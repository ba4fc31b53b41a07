"""The load benchmark's pure parts: mode weights, percentiles, error outcomes, memory trends, the table."""

from __future__ import annotations

import argparse

import httpx
import pytest

from bench.load import (
    Tally,
    latency,
    parse_args,
    parse_modes,
    process_report,
    slope_per_minute,
    table,
    transport_outcome,
)


def test_mode_weights():
    assert parse_modes("colbert:2,hybrid:1,keyword:1") == {"colbert": 2.0, "hybrid": 1.0, "keyword": 1.0}
    assert parse_modes("colbert, keyword:0") == {"colbert": 1.0}
    for bad in ("dense:1", "keyword:0", "colbert:-1", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_modes(bad)


def test_defaults_are_the_issue_figures():
    options = parse_args([])
    assert (options.duration, options.clients, options.workers) == (600.0, 16, 2)
    assert not options.standin and set(options.modes) == {"colbert", "hybrid", "keyword"}


def test_latency_percentiles_in_ms():
    assert latency([]) == {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}
    figures = latency([i / 1000 for i in range(1, 101)])
    assert figures["n"] == 100 and round(figures["p50"]) in (50, 51) and round(figures["p99"]) == 99
    assert latency([2.0], scale=1.0)["p95"] == 2.0


def test_transport_failures_are_named():
    request = httpx.Request("POST", "http://x/")
    assert transport_outcome(httpx.ReadTimeout("slow", request=request)) == "timeout"
    assert transport_outcome(httpx.ConnectTimeout("slow", request=request)) == "timeout"
    assert transport_outcome(httpx.ConnectError("refused", request=request)) == "connect_error"
    assert transport_outcome(httpx.RemoteProtocolError("closed", request=request)) == "connection_dropped"
    assert transport_outcome(httpx.ReadError("reset", request=request)) == "connection_dropped"


def test_tally_counts_every_outcome_and_times_only_successes():
    tally = Tally(keep_errors=1)
    tally.record("search:colbert", "200", 0.01)
    tally.record("search:keyword", "200", 0.02)
    tally.record("search:colbert", "503", 0.5, at=3.0, detail="busy")
    tally.record("upsert", "timeout", 60.0, at=4.0)
    tally.record("upsert", "202", 0.03)
    assert tally.total() == 5 and tally.total("search:") == 3
    assert tally.errors() == {"search:colbert": {"503": 1}, "upsert": {"timeout": 1}}
    assert tally.error_count() == 2
    assert sorted(tally.ok_latencies("search:")) == [0.01, 0.02]
    assert tally.first_errors == [
        {"at_s": 3.0, "kind": "search:colbert", "outcome": "503", "seconds": 0.5, "detail": "busy"}
    ]


def test_slope_per_minute():
    assert slope_per_minute([(0, 1.0), (60, 2.0)]) is None
    assert slope_per_minute([(0, 100.0), (60, 110.0), (120, 120.0)]) == pytest.approx(10.0)
    assert slope_per_minute([(0, 5.0), (30, 5.0), (60, 5.0)]) == pytest.approx(0.0)


def _sample(t: float, rss: float, pss: float) -> dict:
    return {
        "t": t,
        "processes": [{"pid": 7, "role": "writer", "rss_mib": rss, "pss_mib": pss}, {"pid": 8, "role": "reader"}],
    }


def test_process_report_start_end_growth():
    report = process_report([_sample(0, 500, 400), _sample(60, 560, 420), _sample(120, 540, 440)], 7)
    assert (report["role"], report["start_rss_mib"], report["end_rss_mib"], report["max_rss_mib"]) == (
        "writer",
        500,
        540,
        560,
    )
    assert report["growth_pss_mib"] == 40 and report["slope_pss_mib_per_min"] == pytest.approx(20.0)
    assert report["first_quarter_median_pss_mib"] == 400 and report["last_quarter_median_pss_mib"] == 440
    assert process_report([_sample(0, 1, 1)], 99) == {}


def test_quarter_medians_pass_over_a_peak_at_the_start():
    series = [_sample(t, 500, 1500 if t == 0 else 800 + t / 100) for t in range(0, 1600, 100)]
    report = process_report(series, 7)
    assert report["start_pss_mib"] == 1500 and report["growth_pss_mib"] < -600
    assert (report["first_quarter_median_pss_mib"], report["last_quarter_median_pss_mib"]) == (802.5, 813.5)


def test_table_tolerates_missing_parts():
    assert "| errors (goal 0) | 0 (none) |" in table({})
    text = table(
        {
            "options": {"clients": 16},
            "load": {
                "errors": 1,
                "errors_by_kind": {"upsert": {"timeout": 1}},
                "processes": [process_report([_sample(0, 500, 400), _sample(60, 500, 400)], 7), {}],
            },
        }
    )
    assert "upsert {'timeout': 1}" in text and "| writer 7 | 500.0 → 500.0 (500.0) |" in text
