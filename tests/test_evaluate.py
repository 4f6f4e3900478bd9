"""Offline evaluation on a random-init checkpoint: runs, and bicubic matches client.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cxr_sr.client import metrics
from cxr_sr.train import checkpoint
from cxr_sr.train.data import DataConfig, build_dataset
from cxr_sr.train.evaluate import evaluate, main, table
from cxr_sr.train.models import UNetConfig, VAEConfig

from cxr_sr import Schedule
from cxr_sr.imaging import bicubic_upsample


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    return checkpoint.random_init(
        folder,
        VAEConfig(channels=[8, 8, 16], latent_channels=2, norm_groups=4),
        UNetConfig(channels=[16, 32], norm_groups=4),
        Schedule(num_train_timesteps=50),
        seed=0,
    )


def _data():
    return DataConfig(source="phantom", phantom_size=256, n_eval_images=2)


def test_evaluate_reports_bicubic_like_client_metrics(tiny_ckpt):
    ds = build_dataset(_data(), "test")
    res = evaluate(tiny_ckpt, ds, [1, 2], batch_size=2)
    assert set(res["methods"]) == {"bicubic", "vae_ceiling", "sr_1steps", "sr_2steps"}
    hr = np.stack([ds[i][0].numpy() for i in range(len(ds))])
    lr = np.stack([ds[i][1].numpy() for i in range(len(ds))])
    bic = np.clip(bicubic_upsample(lr), 0.0, 1.0)
    b = res["methods"]["bicubic"]
    assert b["psnr"] == pytest.approx(float(np.mean(metrics.psnr(bic, hr))), rel=1e-9)
    assert b["ssim"] == pytest.approx(float(np.mean(metrics.ssim(bic, hr))), rel=1e-9)
    assert b["hfen"] == pytest.approx(float(np.mean(metrics.hfen(bic, hr))), rel=1e-9)
    for row in res["methods"].values():
        assert np.isfinite([row["psnr"], row["ssim"], row["ms_ssim"], row["hfen"]]).all()
        assert row["seconds_per_image"] >= 0
    assert res["methods"]["sr_2steps"]["steps"] == 2
    assert "PSNR" in table(res)


def test_evaluate_rejects_bad_backend(tiny_ckpt):
    with pytest.raises(ValueError, match="backend"):
        evaluate(tiny_ckpt, build_dataset(_data(), "test"), [1], backend="tensorrt")
    with pytest.raises(ValueError, match="onnx_dir"):
        evaluate(tiny_ckpt, build_dataset(_data(), "test"), [1], backend="onnx")


def test_cli_writes_json(tiny_ckpt, tmp_path):
    out = tmp_path / "eval.json"
    rc = main(
        [
            "--checkpoint",
            str(tiny_ckpt),
            "--data",
            "phantom",
            "--set",
            "phantom_size=256",
            "--set",
            "n_eval_images=1",
            "--steps",
            "1",
            "--out",
            str(out),
            "--no-lpips",
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 1 and "sr_1steps" in res["methods"]
