"""benchmarks.vae_cost: both VAEs timed side by side, attention memory reported."""

from __future__ import annotations

import json

import pytest

from benchmarks import vae_cost


@pytest.mark.slow
def test_vae_cost_compares_the_first_version_with_a_checkpoint(checkpoint, tmp_path):
    out = tmp_path / "vae_cost.json"
    argv = ["--checkpoint", str(checkpoint), "--sizes", "16", "--repeats", "1", "--out", str(out)]
    assert vae_cost.main(argv) == 0
    report = json.loads(out.read_text())
    first, new = report["cases"]
    assert first["model"] == "first version" and new["model"] == str(checkpoint)
    assert first["attention_bytes"]["vae"] == 4 * (16 * 16) ** 2  # f=4: 256 latent tokens
    assert new["attention_bytes"]["vae"] == 0  # the tiny checkpoint has the new architecture
    assert all(c["total_ms"] > 0 for c in (first, new))
    assert report["speedup"]["16"] == pytest.approx(first["total_ms"] / new["total_ms"])
