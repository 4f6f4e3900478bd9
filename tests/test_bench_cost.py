"""benchmarks.cost: latency, output MP/s and per-process memory by LR size, through the server."""

from __future__ import annotations

import json

import pytest

from benchmarks import cost


def test_sizes_above_the_server_are_skipped_and_its_maximum_is_measured():
    measure, skipped = cost.sizes_to_measure([64, 128, 256], 16, 128)
    assert measure == [64, 128] and [s["lr_side"] for s in skipped] == [256]
    measure, skipped = cost.sizes_to_measure([64, 256], 16, 200)
    assert measure == [64, 200] and "[16, 200]" in skipped[0]["reason"]


def test_time_case_reports_megapixels_per_second():
    row = cost.time_case("x", lambda: None, 2_000_000, runs=3, warmup=1, path="client")
    assert row["output_mp"] == 2.0 and row["path"] == "client" and row["runs"] == 3
    assert row["mp_per_s"] == pytest.approx(2.0 / (row["latency_ms"] / 1e3))
    assert row["ms_per_mp"] == pytest.approx(row["latency_ms"] / 2.0)


def test_cost_through_the_server(server, tmp_path):
    """Every measured size has a row; the memory of tritonserver and of one stub per model
    instance is read at the largest size (the tiny repository serves LR 16-128)."""
    report = cost.run(
        server.grpc_url,
        [16, 512],
        {"steps": 1, "seed": 0},
        runs=1,
        warmup=0,
        concurrency=2,
        server_pid=server.process.pid,
    )
    assert [r["lr_side"] for r in report["rows"]] == [16, 128, 512]  # 512: client tiling
    assert report["rows"][-1]["path"] == "client" and report["rows"][-1]["tiles"] > 1
    assert report["skipped"][0]["lr_side"] == 512 and report["max_side"] == 128
    assert all(r["mp_per_s"] > 0 for r in report["rows"])
    assert all(r["mp_per_s_c2"] > 0 for r in report["rows"] if r["path"] == "server")
    names = {m["process"] for m in report["memory"]["128"]}
    assert {"tritonserver", "sampler_0_0", "unet_0_0", "vae_encoder_0_0"} <= names
    assert all(m["peak_mib"] >= m["rss_mib"] > 0 for m in report["memory"]["128"])
    rows = cost.memory_rows(report)
    assert rows[-1][0] == "all" and rows[-1][2] == pytest.approx(sum(r[2] for r in rows[:-1]))
    json.dumps(report)  # the report is what main() writes
