"""benchmarks.perf's report files: the per-size CSV and the latency/throughput plot."""

from __future__ import annotations

import csv

import pytest

from benchmarks.perf import (
    CSV_FIELDS,
    HEADERS,
    PerfResult,
    _failed,
    _summary,
    model_activity,
    plot,
    result_rows,
    write_csv,
)


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


def _counters(requests, executions, queue_ms, infer_ms):
    ms = 1_000_000
    return {
        "requests": requests,
        "executions": executions,
        "failed": 0,
        "queue_ns": queue_ms * ms,
        "compute_input_ns": 0,
        "compute_infer_ns": infer_ms * ms,
        "compute_output_ns": 0,
    }


def test_model_activity_is_the_difference_of_two_snapshots():
    before = {"sampler": _counters(10, 10, 50, 100), "unet": _counters(10, 10, 0, 80)}
    after = {
        "sampler": _counters(74, 12, 50 + 640, 100 + 64 * 30),  # 64 more in 2 batches
        "unet": _counters(10, 10, 0, 80),  # idle during the level
        "cxr_sr": _counters(64, 64, 0, 64 * 31),  # loaded after the first snapshot
    }
    activity = model_activity(before, after)
    assert set(activity) == {"sampler", "cxr_sr"}
    assert activity["sampler"]["requests"] == 64
    assert activity["sampler"]["mean_batch"] == pytest.approx(32.0)
    assert activity["sampler"]["queue_ms"] == pytest.approx(10.0)
    assert activity["sampler"]["compute_infer_ms"] == pytest.approx(30.0)
    assert activity["cxr_sr"]["mean_batch"] == pytest.approx(1.0)
    assert model_activity(None, after) is None and model_activity(before, None) is None
    result = _result(64, 64, 100.0, 300.0)
    result.models = activity
    assert "mean batch: sampler 32.0, cxr_sr 1.0" in _summary(result)
    # the queue a cxr_sr request saw: the sampler's, not perf_analyzer's ensemble figure
    assert result.queue_ms is None  # which model was load-tested is not known
    result.model = "cxr_sr"
    assert result.queue_ms == pytest.approx(10.0)
    activity["vae_encoder"] = {**activity["cxr_sr"], "queue_ms": 2.0}  # 64 requests, 2 ms
    assert result.queue_ms == pytest.approx(12.0)
    assert result_rows([result])[0][HEADERS.index("queue ms")] == pytest.approx(12.0)
