"""``make soak`` in small: the real perf_analyzer against a real tritonserver on the tiny
repository for ~20 s, mixed LR sizes, memory sampled; the report is written and honest."""

from __future__ import annotations

import json

import pytest

from benchmarks import soak


def test_memory_growth_is_measured_against_the_warm_up_peak():
    samples = [
        (0.0, {"unet": 100.0, "sampler": 50.0}),
        (5.0, {"unet": 120.0, "sampler": 50.0}),
        (11.0, {"unet": 118.0, "sampler": 55.0}),
        (20.0, {"unet": 126.0, "sampler": None}),
    ]
    rows = {m.process: m for m in soak.memory_growth(samples, warmup_s=10.0, window_s=6.0)}
    assert rows["unet"].warm_peak_mib == 120.0 and rows["unet"].peak_after_mib == 126.0
    assert rows["unet"].growth == pytest.approx(0.05)
    # floors: the lowest sample of the last 6 s of each phase (120 at 5 s; 126 at 20 s)
    assert rows["unet"].warm_floor_mib == 120.0 and rows["unet"].end_floor_mib == 126.0
    assert rows["sampler"].growth is None  # it vanished: no figure, and the verdict says so
    report = {
        "failed_requests": 0,
        "perf_analyzer_exit": 0,
        "perf_analyzer_error": None,
        "memory": [m.__dict__ for m in rows.values()],
    }
    problems = soak.verdict(report, max_growth=0.10)
    assert problems == ["sampler: no memory figure (process gone?)"]
    assert soak.verdict({**report, "failed_requests": 2, "memory": []}, 0.1) == [
        "2 failed requests"
    ]


@pytest.mark.integration
def test_short_soak_on_the_tiny_repository(built_repository, tmp_path):
    repo, _ = built_repository
    out = tmp_path / "soak.json"
    args = ["--repository", str(repo), "--out", str(out), "--concurrency", "4"]
    short = ["--duration-s", "21", "--warmup-s", "7", "--sizes", "16,48", "--interval-s", "1"]
    code = soak.main([*args, *short, "--max-growth", "0.5"])
    report = json.loads(out.read_text())
    assert report["failed_requests"] == 0 and report["perf_analyzer_exit"] == 0
    assert report["completed_requests"] > 10 and report["throughput_img_s"] > 0
    processes = {m["process"] for m in report["memory"]}
    assert processes == {"tritonserver", "vae_encoder", "sampler", "unet", "vae_decoder"}
    assert all(m["growth"] is not None and m["warm_floor_mib"] > 10 for m in report["memory"])
    assert report["durations_s"]["load"] >= 18 and report["durations_s"]["server_stop"] < 10
    assert report["versions"]["tritonserver"] and report["device"]["cpu"]
    assert code == (0 if report["passed"] else 1)
    assert len(report["rss_samples"]) >= 15
