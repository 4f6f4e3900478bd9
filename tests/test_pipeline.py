"""The offline pipeline (train.pipeline): one loop, torch and onnxruntime backends agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_sr import SamplingOptions
from cxr_sr.train import checkpoint as ckpt_mod
from cxr_sr.train.models import VAEConfig, build_vae, latent_shape
from cxr_sr.train.pipeline import (
    OnnxPipeline,
    TorchPipeline,
    find_graph,
    super_resolve,
)

PLANS = [
    SamplingOptions(steps=2, sampler="ddim", start="lr", strength=0.5),
    SamplingOptions(steps=3, sampler="ddpm", start="noise"),
]


def _lr(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 64, 64), dtype=np.float32)


def test_latent_shape_of_a_vae_its_config_and_the_checkpoint(checkpoint):
    cfg = VAEConfig(channels=[8, 8, 16], latent_channels=2, norm_groups=4)
    vae = build_vae(cfg)
    assert latent_shape(cfg) == latent_shape(vae) == latent_shape(vae.config) == (2, 64, 64)
    assert latent_shape(cfg, size=512) == (2, 128, 128)
    ck = ckpt_mod.load(checkpoint)
    assert latent_shape(ck.vae.vae) == ck.latent_shape


def test_torch_pipeline_is_encoder_sample_decoder(checkpoint):
    """super_resolve (tensors, the training loop's samples) == TorchPipeline (arrays)."""
    ck = ckpt_mod.load(checkpoint)
    pipe = TorchPipeline(ck.vae, ck.denoiser)
    lr = _lr()
    sr = pipe.super_resolve(lr, ck.schedule, PLANS[0], seed=3)
    assert sr.shape == (2, 1, 256, 256) and sr.dtype == np.float32
    assert sr.min() >= 0.0 and sr.max() <= 1.0
    got = super_resolve(ck.vae, ck.denoiser, ck.schedule, PLANS[0], torch.from_numpy(lr), seed=3)
    np.testing.assert_array_equal(got.numpy(), sr)
    # the seed decides the noise: a different seed, a different sample (ddpm adds noise)
    a = pipe.super_resolve(lr, ck.schedule, PLANS[1], seed=0)
    b = pipe.super_resolve(lr, ck.schedule, PLANS[1], seed=1)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("plan", PLANS, ids=["ddim_lr", "ddpm_noise"])
def test_torch_and_onnx_backends_agree(checkpoint, built_repository, plan):
    _, onnx_dir = built_repository
    ck = ckpt_mod.load(checkpoint)
    torch_pipe, onnx_pipe = TorchPipeline(ck.vae, ck.denoiser), OnnxPipeline(onnx_dir)
    lr = _lr(3, seed=1)
    np.testing.assert_allclose(onnx_pipe.encode_lr(lr), torch_pipe.encode_lr(lr), atol=1e-4)
    z = np.random.default_rng(2).standard_normal(onnx_pipe.encode_lr(lr).shape).astype("f4")
    t = np.array([0, 40, 299], dtype=np.float32)
    np.testing.assert_allclose(
        onnx_pipe.denoise(z, t, z), torch_pipe.denoise(z, t, z), atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(onnx_pipe.decode(z, lr), torch_pipe.decode(z, lr), atol=1e-4)
    sr_onnx = onnx_pipe.super_resolve(lr, ck.schedule, plan, seed=7)
    sr_torch = torch_pipe.super_resolve(lr, ck.schedule, plan, seed=7)
    assert sr_onnx.shape == sr_torch.shape == (3, 1, 256, 256)
    np.testing.assert_allclose(sr_onnx, sr_torch, atol=1e-3)


@pytest.mark.parametrize("size,origin", [((16, 16), (0, 0)), ((41, 30), (7, 12))])
def test_backends_agree_at_any_size_and_origin(checkpoint, built_repository, size, origin):
    """Non-multiple sides (padding inside the graphs) and a tile origin (noise placed by
    global position): onnxruntime and torch give the same SR of the LR's own size x4."""
    _, onnx_dir = built_repository
    ck = ckpt_mod.load(checkpoint)
    torch_pipe, onnx_pipe = TorchPipeline(ck.vae, ck.denoiser), OnnxPipeline(onnx_dir)
    assert torch_pipe.vae_factor == onnx_pipe.vae_factor == 4
    lr = np.random.default_rng(3).random((2, 1, *size), dtype=np.float32)
    plan = PLANS[1]
    a = onnx_pipe.super_resolve(lr, ck.schedule, plan, seed=2, origin=origin)
    b = torch_pipe.super_resolve(lr, ck.schedule, plan, seed=2, origin=origin)
    assert a.shape == b.shape == (2, 1, 4 * size[0], 4 * size[1])
    np.testing.assert_allclose(a, b, atol=1e-3)
    if origin != (0, 0):  # the origin moves the noise, hence the sample
        assert not np.allclose(b, torch_pipe.super_resolve(lr, ck.schedule, plan, seed=2))


def test_onnx_pipeline_refuses_graphs_without_geometry(tmp_path, built_repository):
    """Graphs exported before any-size serving carry no vae_factor: a clear error."""
    import onnx

    _, onnx_dir = built_repository
    for name in ("vae_encoder", "unet", "vae_decoder"):
        model = onnx.load(onnx_dir / f"{name}.onnx")
        del model.metadata_props[:]
        onnx.save(model, tmp_path / f"{name}.onnx")
    with pytest.raises(ValueError, match="rebuild"):
        OnnxPipeline(tmp_path)


def test_onnx_pipeline_finds_graphs_in_a_repository(built_repository):
    repo, onnx_dir = built_repository
    assert find_graph(onnx_dir, "unet") == onnx_dir / "unet.onnx"
    with pytest.raises(FileNotFoundError, match="vae_encoder"):
        find_graph(repo.parent / "nowhere", "vae_encoder")


def test_evaluate_scores_both_backends_alike(checkpoint, built_repository):
    """train.evaluate runs the same pipeline whichever backend: the SR rows agree."""
    from cxr_sr.train.data import DataConfig, build_dataset
    from cxr_sr.train.evaluate import evaluate

    _, onnx_dir = built_repository
    ds = build_dataset(DataConfig(source="phantom", phantom_size=256, n_eval_images=2), "test")
    kw = {"batch_size": 2, "use_lpips": False, "options": PLANS[0]}
    a = evaluate(checkpoint, ds, [2], **kw)["methods"]["sr_2steps"]
    b = evaluate(checkpoint, ds, [2], backend="onnx", onnx_dir=onnx_dir, **kw)["methods"]
    assert b["sr_2steps"]["psnr"] == pytest.approx(a["psnr"], abs=1e-3)
    assert b["sr_2steps"]["ssim"] == pytest.approx(a["ssim"], abs=1e-4)


def test_stage_benchmark_times_the_shared_pipeline(built_repository):
    from benchmarks.stages import offline_timings

    repo, onnx_dir = built_repository
    res = offline_timings(onnx_dir, repo, _lr(1), [1, 2], runs=1, warmup=0, spinning=False)
    assert set(res["stages"]) == {"vae_encoder", "unet", "vae_decoder"}
    assert set(res["full"]) == {1, 2} and "marginal_step_ms" in res["loop"]


def test_stage_benchmark_times_the_served_graphs_by_default(built_repository, tmp_path):
    """Without --onnx-dir the in-process side runs the repository's own model.onnx files (the
    fused-attention UNet the server runs, not build/onnx's portable one), spinning as served."""
    import json

    from benchmarks.stages import main

    repo, _ = built_repository
    out = tmp_path / "stages.json"
    argv = ["--repository", str(repo), "--only", "offline", "--runs", "1", "--warmup", "0"]
    assert main([*argv, "--steps", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["onnx_dir"] == str(repo) and report["offline_spinning"] == "run"
    assert set(report["results"]["offline"]["full"]) == {"1"}
