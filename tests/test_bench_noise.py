"""benchmarks.noise: one thread against several, side by side, the same noise from both."""

from __future__ import annotations

import json

from benchmarks import noise


def test_noise_benchmark_times_both_and_finds_them_identical(tmp_path, capsys):
    out = tmp_path / "noise.json"
    argv = ["--batches", "1,8", "--sizes", "64", "--threads", "2", "--repeats", "2"]
    assert noise.main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["threads"] == [1, 2]
    assert [(c["lr_side"], c["batch"]) for c in report["cases"]] == [(64, 1), (64, 8)]
    for case in report["cases"]:
        assert case["identical"] is True
        assert case["latent_shape"] == [4, 64, 64]  # the demo VAE: latent side = LR side
        assert all(case["ms"][n] > 0 for n in ("1", "2"))
    printed = capsys.readouterr().out
    assert "2 threads ms" in printed and "device:" in printed.lower()
