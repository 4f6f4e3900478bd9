"""Exact resume: N steps straight == N/2, process exit, resume, N/2 more (both stages, CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr_sr.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEBUG = ROOT / "train" / "configs" / "debug.yaml"


def _train(out: Path, *extra: str) -> str:
    cmd = [
        sys.executable,
        "-m",
        "cxr_sr.train.loop",
        "--config",
        str(DEBUG),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("pool", [(), ("--set", "device_items=24")], ids=["loader", "pool"])
def test_resume_is_exact_in_both_stages(tmp_path, pool):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, *pool)  # 4 VAE + 4 UNet steps
    out = _train(resumed, "--stop-after", "2", *pool)  # stops mid stage 1
    assert "stopped" in out and not (resumed / "checkpoint").exists()
    out = _train(resumed, "--resume", "--stop-after", "4", *pool)  # stage 1 done, 2 UNet steps
    assert "resuming vae at step 2" in out and "stopped" in out
    if pool:
        assert "24 training pairs held on cpu" in out
    out = _train(resumed, "--resume", *pool)
    assert "resuming unet at step 2" in out

    a, b = checkpoint.load(straight / "checkpoint"), checkpoint.load(resumed / "checkpoint")
    assert a.vae.scaling == b.vae.scaling
    assert _same(a.vae.state_dict(), b.vae.state_dict())
    assert _same(a.denoiser.state_dict(), b.denoiser.state_dict())
    sa = torch.load(straight / "state" / "state.pt", weights_only=False)
    sb = torch.load(resumed / "state" / "state.pt", weights_only=False)
    assert _same(sa["unet"], sb["unet"])
