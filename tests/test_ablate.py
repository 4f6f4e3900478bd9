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
        "plain_vae,regression,vae_attention,lr_start",
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
        "--steps",
        "1,2",
        "--set",
        "unet.batch_size=2",
        "--no-progress",
    ]
    assert ablate.main(args) == 0
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    # "diffusion" is trained for lr_start, not scored
    assert list(rows) == ["regression", "vae_attention", "lr_start", "plain_vae"]
    assert result["overrides"] == ["unet.batch_size=2"]
    assert rows["plain_vae"]["sr"] == {} and set(rows["regression"]["sr"]) == {"1", "2"}
    assert rows["lr_start"]["sampling"]["start"] == "lr"
    assert rows["lr_start"]["sampling"]["strength"] == 0.5
    assert not checkpoint.load(out / "plain_vae" / "checkpoint").vae.is_residual
    # denoiser variants load the shared VAE and LR encoder: identical weights, own denoisers
    shared = checkpoint.load(out / "vae" / "checkpoint").vae.state_dict()
    for name in ("diffusion", "regression"):
        got = checkpoint.load(out / name / "checkpoint")
        assert got.vae.lr_encoder is not None
        assert all((got.vae.state_dict()[k] == shared[k]).all() for k in shared)
        assert got.meta["train"]["unet"]["batch_size"] == 2
    own = checkpoint.load(out / "vae_attention" / "checkpoint").vae.vae
    assert own.config.mid_block_add_attention and own.config.block_out_channels
    assert checkpoint.load(out / "regression" / "checkpoint").meta["train"]["unet"]["regression"]
    table = (out / "ablation.md").read_text()
    assert "| regression |" in table and "| bicubic |" in table
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
