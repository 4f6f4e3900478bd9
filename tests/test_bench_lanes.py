"""benchmarks.lanes: one lane against two on the served graphs, the same SR from both."""

from __future__ import annotations

import json

import pytest

from benchmarks import lanes


def test_lanes_benchmark_times_both_and_finds_the_same_sr(built_repository, tmp_path, capsys):
    repo, _ = built_repository
    out = tmp_path / "lanes.json"
    argv = ["--repository", str(repo), "--sizes", "16", "--batches", "1,3", "--repeats", "1"]
    assert lanes.main([*argv, "--threads", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["lanes"] == [1, 2] and report["threads"] == 2
    assert [(c["lr_side"], c["batch"]) for c in report["cases"]] == [(16, 1), (16, 3)]
    for case in report["cases"]:
        assert case["max_abs_diff"] <= lanes.TOLERANCE
        assert all(case["ms_per_image"][n] > 0 for n in ("1", "2"))
    printed = capsys.readouterr().out
    assert "2 lanes ms" in printed and "device:" in printed.lower()


def test_lanes_benchmark_refuses_one_lane(built_repository, capsys):
    repo, _ = built_repository
    with pytest.raises(SystemExit) as stop:
        lanes.main(["--repository", str(repo), "--lanes", "1"])
    assert stop.value.code == 2
    assert "--lanes must be at least 2" in capsys.readouterr().err
