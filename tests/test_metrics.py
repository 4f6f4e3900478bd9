"""client.metrics against scikit-image (PSNR, SSIM) and basic properties (MS-SSIM, HFEN)."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_sr.client.metrics import hfen, log_kernel, ms_ssim, psnr, ssim

skm = pytest.importorskip("skimage.metrics")
ndimage = pytest.importorskip("scipy.ndimage")


def _smooth_image(seed: int = 0, size: int = 256) -> np.ndarray:
    """A radiograph-like test image: smooth blobs plus a few sharp edges, in [0, 1]."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random((size, size)), 4)
    x[size // 4 : size // 2, size // 3 :] += 0.02  # an edge
    return (x - x.min()) / (x.max() - x.min())


def _pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    x = _smooth_image()
    return {
        "identical": (x, x.copy()),
        "noisy": (x, np.clip(x + 0.03 * rng.standard_normal(x.shape), 0, 1)),
        "blurred": (x, ndimage.gaussian_filter(x, 1.5)),
        "shifted": (x, np.clip(x * 0.9 + 0.05, 0, 1)),
        "random": (rng.random((256, 256)), rng.random((256, 256))),
        "small_rect": (x[:40, :57], ndimage.gaussian_filter(x[:40, :57], 1.0)),
    }


@pytest.mark.parametrize("case", list(_pairs()))
def test_ssim_matches_skimage(case: str) -> None:
    x, y = _pairs()[case]
    ref = skm.structural_similarity(
        x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert ssim(x, y) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("case", [c for c in _pairs() if c != "identical"])
def test_psnr_matches_skimage(case: str) -> None:
    x, y = _pairs()[case]
    assert psnr(x, y) == pytest.approx(skm.peak_signal_noise_ratio(x, y, data_range=1.0))


def test_data_range_is_honoured() -> None:
    x, y = _pairs()["noisy"]
    ref = skm.structural_similarity(
        x * 255,
        y * 255,
        data_range=255.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert ssim(x * 255, y * 255, data_range=255.0) == pytest.approx(ref, abs=1e-6)
    assert psnr(x * 255, y * 255, data_range=255.0) == pytest.approx(psnr(x, y))


def test_identical_images() -> None:
    x = _smooth_image()
    assert psnr(x, x) == float("inf")
    assert ssim(x, x) == pytest.approx(1.0)
    assert ms_ssim(x, x) == pytest.approx(1.0)
    assert hfen(x, x) == 0.0


def test_batched_shapes_give_per_image_values() -> None:
    pairs = _pairs()
    xs = np.stack([pairs[k][0] for k in ("noisy", "blurred", "shifted")])
    ys = np.stack([pairs[k][1] for k in ("noisy", "blurred", "shifted")])
    for fn in (psnr, ssim, ms_ssim, hfen):
        single = [fn(x, y) for x, y in zip(xs, ys, strict=True)]
        for batch in (fn(xs, ys), fn(xs[:, None], ys[:, None])):
            assert isinstance(batch, np.ndarray) and batch.shape == (3,)
            np.testing.assert_allclose(batch, single, rtol=1e-12)
        assert isinstance(single[0], float)


def test_ms_ssim_properties() -> None:
    x = _smooth_image()
    rng = np.random.default_rng(2)
    values = [
        ms_ssim(x, np.clip(x + s * rng.standard_normal(x.shape), 0, 1)) for s in (0.01, 0.05, 0.2)
    ]
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    y = ndimage.gaussian_filter(x, 2.0)
    assert ms_ssim(x, y) == pytest.approx(ms_ssim(y, x))  # symmetric
    assert 0.0 <= ms_ssim(x, rng.random(x.shape)) < 0.5
    # 64 x 64 fits 3 scales; asking for more is an error.
    assert 0 < ms_ssim(x[:64, :64], y[:64, :64]) < 1
    with pytest.raises(ValueError, match="scales"):
        ms_ssim(x[:64, :64], y[:64, :64], scales=5)
    assert ms_ssim(x, y, scales=1) == pytest.approx(ssim(x, y))


def test_hfen_grows_with_blur() -> None:
    x = _smooth_image()
    values = [hfen(ndimage.gaussian_filter(x, s), x) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert values[0] > 0


def test_log_filter_matches_direct_convolution() -> None:
    from cxr_sr.client.metrics import _log_filter

    rng = np.random.default_rng(3)
    a = rng.random((30, 41))
    k = log_kernel()
    assert k.shape == (15, 15) and abs(k.sum()) < 1e-12
    direct = ndimage.correlate(a, k, mode="reflect")
    np.testing.assert_allclose(_log_filter(a[None], 1.5, 15)[0], direct, atol=1e-12)


def test_bad_inputs_raise_value_error() -> None:
    x = _smooth_image(size=64)
    with pytest.raises(ValueError, match="shape"):
        psnr(x, x[:32])
    with pytest.raises(ValueError):
        ssim(x[None, None].repeat(2, axis=1), x[None, None].repeat(2, axis=1))
    with pytest.raises(ValueError, match="at least"):
        ssim(x[:8, :8], x[:8, :8])
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        hfen(bad, x)
