"""The ablation driver on the debug config: shared VAE, VAE-only and sampling-only variants."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxr_sr.train import ablate, checkpoint

DEBUG = Path(__file__).resolve().parents[1] / "train" / "configs" / "debug.yaml"


@pytest.mark.slow
def test_ablation_rows_share_the_vae_and_reuse_runs(tmp_path, capsys):
    out = tmp_path / "abl"
    args = [
        "--config",
        str(DEBUG),
        "--out",
        str(out),
        "--only",
        "plain_vae,pixel_v,pixel_lr05",
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
        "--steps",
        "1,2",
        "--no-progress",
    ]
    assert ablate.main(args) == 0
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["plain_vae", "pixel_v", "pixel_lr05"]  # "pixel" trained, not scored
    assert rows["plain_vae"]["sr"] == {} and set(rows["pixel_v"]["sr"]) == {"1", "2"}
    assert rows["pixel_lr05"]["sampling"]["start"] == "lr"
    assert rows["pixel_lr05"]["sampling"]["strength"] == 0.5
    assert not checkpoint.load(out / "plain_vae" / "checkpoint").vae.is_residual
    # denoiser variants load the shared VAE: identical VAE weights, own denoisers
    shared = checkpoint.load(out / "vae" / "checkpoint").vae.vae.state_dict()
    for name in ("pixel", "pixel_v"):
        got = checkpoint.load(out / name / "checkpoint").vae.vae.state_dict()
        assert all((got[k] == shared[k]).all() for k in shared)
    assert checkpoint.load(out / "pixel_v" / "checkpoint").schedule.prediction == "v"
    table = (out / "ablation.md").read_text()
    assert "| pixel_v |" in table and "| bicubic |" in table
    capsys.readouterr()
    assert ablate.main(args) == 0  # finished runs are re-used, same figures
    assert "re-using" in capsys.readouterr().out
    again = json.loads((out / "ablation.json").read_text())
    assert again["rows"] == result["rows"]


def test_unknown_variant_is_named(capsys):
    with pytest.raises(SystemExit) as e:
        ablate.main(["--only", "nope"])
    assert e.value.code == 2
    assert "unknown variant(s) nope" in capsys.readouterr().err
