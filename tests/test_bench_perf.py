"""benchmarks.perf's report files: the per-size CSV and the latency/throughput plot."""

from __future__ import annotations

import csv

from benchmarks.perf import CSV_FIELDS, PerfResult, _failed, plot, write_csv


def _result(side, c, throughput, p50):
    return PerfResult(
        c,
        throughput,
        p50,
        p50 * 1.2,
        p50 * 1.3,
        p50 * 1.5,
        0.1,
        p50 * 0.9,
        0,
        True,
        0,
        lr_side=side,
    )


def test_csv_has_one_row_per_size_and_concurrency(tmp_path):
    results = [_result(64, 1, 4.0, 250.0), _result(64, 4, 6.0, 650.0), _result(128, 1, 1.0, 1e3)]
    failed = _failed(16, 1, "server unreachable", failed=2)
    failed.lr_side = 128
    path = write_csv(tmp_path / "perf.csv", [*results, failed])
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS
    assert [(r["lr_side"], r["concurrency"]) for r in rows] == [
        ("64", "1"),
        ("64", "4"),
        ("128", "1"),
        ("128", "16"),
    ]
    # output MP/s: images/s x (4 x LR side)^2
    assert float(rows[1]["output_mp_per_s"]) == 6.0 * 256**2 / 1e6
    assert float(rows[2]["output_mp_per_s"]) == 1.0 * 512**2 / 1e6
    assert rows[3]["throughput"] == "" and rows[3]["failed_requests"] == "2"
    assert rows[3]["error"] == "server unreachable"


def test_plot_writes_a_png(tmp_path):
    results = [_result(64, c, 2.0 + c, 100.0 * c) for c in (1, 2, 4)]
    path = plot(tmp_path / "perf.png", [*results, _result(128, 1, 1.0, 900.0)], "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
