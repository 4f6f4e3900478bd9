"""benchmarks.samplers: quality and cost per sampler, step count and early-stop threshold."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import samplers


def test_call_counter_counts_rows_the_network_sees():
    net = torch.nn.Linear(3, 3)
    counter = samplers.CallCounter(net)
    net(torch.zeros(4, 3))
    net(torch.zeros(2, 3))
    counter.close()
    net(torch.zeros(5, 3))  # after close: not counted
    assert counter.rows == 6


def test_arguments_are_checked_against_the_schema():
    assert samplers._samplers("DDIM, dpmpp") == ["ddim", "dpmpp"]
    assert samplers._floats("0.05,0.02") == [0.05, 0.02]
    with pytest.raises(argparse.ArgumentTypeError, match="samplers must be among"):
        samplers._samplers("euler")
    with pytest.raises(argparse.ArgumentTypeError, match="'early_stop'"):
        samplers._floats("2")


@pytest.mark.slow
def test_rows_per_sampler_and_early_stop_with_counted_calls(checkpoint):
    report = samplers.run(checkpoint, [1, 3], ["ddim", "dpmpp"], [1.0], limit=1)
    rows = report["rows"]
    assert [(r["sampler"], r["steps"], r["early_stop"]) for r in rows] == [
        ("ddim", 1, 0.0),
        ("ddim", 3, 0.0),
        ("dpmpp", 1, 0.0),
        ("dpmpp", 3, 0.0),
        ("dpmpp", 3, 1.0),
    ]
    assert [r["calls_per_image"] for r in rows[:4]] == [1, 3, 1, 3]
    # threshold 1.0: an image stops at its second call unless its x0 estimate moved by more
    # than its own norm, so 2 or 3 calls, counted on the network
    assert 2 <= rows[-1]["calls_per_image"] <= 3
    assert rows[0]["psnr"] == pytest.approx(rows[2]["psnr"])  # 1 step: DPM-Solver++ is DDIM
    assert set(report["baselines"]) == {"bicubic", "vae_ceiling"}
    assert "native" in report["title"]
