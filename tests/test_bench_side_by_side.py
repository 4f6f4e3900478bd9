"""benchmarks.bench: the served cxr_sr and the same graphs in one process, side by side."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import bench


def test_served_round_runs_clients_at_once_and_reports_failures():
    calls = [lambda i=i: np.full((1, 1, 2, 2), i, np.float32) for i in range(3)]
    elapsed, outs = bench.served_round(calls)
    assert elapsed >= 0 and [int(o[0, 0, 0, 0]) for o in outs] == [0, 1, 2]

    def broken():
        raise ConnectionError("server went away")

    with pytest.raises(RuntimeError, match="1 of 2 served requests failed: server went away"):
        bench.served_round([calls[0], broken])


def test_cheap_cases_get_rounds_until_the_time_floor(capsys):
    """At least --rounds; past that, rounds go on until the timed rounds took --min-seconds,
    never past --max-rounds."""
    assert not bench.enough_rounds(2, 100.0, rounds=3, min_seconds=1.0, max_rounds=10)
    assert bench.enough_rounds(3, 1.0, rounds=3, min_seconds=1.0, max_rounds=10)
    assert not bench.enough_rounds(3, 0.5, rounds=3, min_seconds=1.0, max_rounds=10)
    assert bench.enough_rounds(10, 0.5, rounds=3, min_seconds=1.0, max_rounds=10)
    assert bench.enough_rounds(3, 0.0, rounds=3, min_seconds=0.0, max_rounds=None)
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "5", "--max-rounds", "4"])
    assert "--max-rounds >= --rounds" in capsys.readouterr().err


@pytest.mark.integration
def test_side_by_side_cases_do_the_same_work(server, built_repository):
    """The calibration keeps the fastest candidate thread setting; every (size, concurrency)
    case has both timings and their ratio; the served SR equals the in-process SR (same
    graphs, inputs, schedule, seed, per-request noise keys): the comparison is like for like."""
    repo, _ = built_repository
    params = {"steps": 2, "seed": 3, "sampler": "dpmpp"}
    probe = np.random.default_rng(0).random((1, 1, 16, 16)).astype(np.float32)
    inproc, candidates = bench.calibrate(repo, params, probe, rounds=1, cores=2)
    best = min(candidates, key=lambda r: r["median_ms"])
    assert (inproc.threads, inproc.spinning) == (best["threads"], best["spinning"])
    assert {(r["threads"], r["spinning"]) for r in candidates} == {
        (1, "off"),  # one thread has no pool to spin
        (2, "off"),
        (2, "run"),
        (2, "on"),
    }
    assert bench.served_threads("match", inproc) == inproc.threads
    assert bench.served_threads("default", inproc) is None
    report = bench.run(
        server.grpc_url,
        inproc,
        params,
        [16, 32, 512],
        [1, 2],
        rounds=1,
        warmup=0,
        min_seconds=0.3,
        max_rounds=4,
    )
    cases = report["cases"]
    assert [(c["lr_side"], c["concurrency"]) for c in cases] == [(16, 1), (16, 2), (32, 1), (32, 2)]
    assert report["skipped_sizes"] == [512]
    for c in cases:
        assert c["served_ms"] > 0 and c["inprocess_ms"] > 0
        assert c["ratio"] == pytest.approx(c["served_ms"] / c["inprocess_ms"])
        assert c["mp_per_s"] == pytest.approx(c["output_mp"] / c["served_ms"] * 1e3)
        assert c["max_abs_diff"] < 1e-5
        assert 1 <= c["rounds"] == len(c["served_round_ms"]) == len(c["inprocess_round_ms"]) <= 4
        timed_s = (sum(c["served_round_ms"]) + sum(c["inprocess_round_ms"])) / 1e3
        assert timed_s >= 0.3 or c["rounds"] == 4
    settings = bench.served_thread_settings(repo)
    assert settings["unet"]["intra_op_spinning"] == "run"  # what the builder writes
    assert bench.served_spinning(settings) == "run"
    assert settings["unet"]["cpu_lanes"] == "auto"
    json.dumps(report)


def test_in_process_spreads_a_batch_as_the_served_models_do(built_repository, monkeypatch):
    """The in-process side takes the served models' lanes (cpu_lanes, or CXR_ORT_LANES)
    with its own thread count, and its call size, so it is the same work, not less."""
    repo, _ = built_repository
    two = bench.InProcess(repo, {"steps": 1}, threads=2, spinning=False)
    assert two.lanes == 2 and "lanes=2" in two.label
    assert two.pipe.networks["vae_decoder"].max_pixels == two.max_pixels
    assert bench.InProcess(repo, {"steps": 1}, threads=1, spinning=False).lanes == 1
    monkeypatch.setenv("CXR_ORT_LANES", "1")
    assert bench.InProcess(repo, {"steps": 1}, threads=2, spinning=False).lanes == 1
    lr = np.random.default_rng(0).random((3, 1, 16, 16), dtype=np.float32)
    one = bench.InProcess(repo, {"steps": 1}, threads=2, spinning=False)
    np.testing.assert_allclose(two(lr), one(lr), atol=1e-6)


def test_in_process_refuses_a_folder_without_the_graphs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX graph for .vae_encoder"):
        bench.InProcess(tmp_path, {"steps": 1}, threads=1, spinning=False)
