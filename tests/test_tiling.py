"""client.tiling: the plan covers the image, the weights sum to 1, a local function comes
back exactly through the tiles; and, through the real model (offline, the demo weights), the
tiled result stays close to the whole-image one with no seam at the tile borders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cxr_sr.client.tiling import (
    axis_starts,
    blend,
    cut,
    default_overlap,
    feather_weights,
    fitted_tile,
    pad_to,
    plan_tiles,
    run_tiled,
)
from cxr_sr.imaging import SCALE, bicubic_upsample

SIZES = [(100, 76), (64, 64), (37, 300), (257, 129), (20, 20)]


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w), dtype=np.float32)


@pytest.mark.parametrize("n,tile,overlap", [(100, 32, 8), (64, 64, 16), (65, 64, 16), (300, 37, 9)])
def test_axis_starts_cover_with_the_overlap(n, tile, overlap):
    starts = axis_starts(n, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, n) == n
    gaps = np.diff(starts)
    assert (gaps > 0).all() and (tile - gaps >= overlap).all()  # neighbours share >= overlap
    if len(starts) > 2:  # the fewest tiles: one less could not keep the overlap
        assert (n - tile) / (len(starts) - 2) > tile - overlap


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("max_side", [16, 32, 64])
def test_plan_covers_the_image_with_equal_tiles(h, w, max_side):
    plan = plan_tiles(h, w, max_side)
    covered = np.zeros((h, w), dtype=int)
    for t in plan.tiles:
        assert (t.height, t.width) == (plan.tile_h, plan.tile_w)
        assert t.top >= 0 and t.left >= 0 and t.top + t.height <= h and t.left + t.width <= w
        covered[t.slices()] += 1
    assert (covered >= 1).all()
    assert len(plan) == len(plan.tiles) == len(plan.rows) * len(plan.cols)
    overlap = default_overlap(max_side)
    for n, tile, starts in ((h, plan.tile_h, plan.rows), (w, plan.tile_w, plan.cols)):
        assert tile <= max_side
        # as few tiles as max_side allows, each as small as that count allows
        assert len(starts) == len(axis_starts(n, min(n, max_side), overlap))
        if len(starts) > 1:
            assert len(axis_starts(n, tile - 1, overlap)) > len(starts)
    if max(h, w) <= max_side:
        assert len(plan) == 1


def test_fitted_tiles_respect_the_server_minimum():
    assert fitted_tile(512, 256, 64) == 214  # 3 tiles of 214 instead of 3 of 256
    assert fitted_tile(100, 64, 16) == 58
    assert fitted_tile(100, 64, 16, min_side=64) == 64  # a fixed-size server
    assert fitted_tile(40, 64, 16) == 40
    plan = plan_tiles(100, 76, 64, min_side=64)
    assert (plan.tile_h, plan.tile_w) == (64, 64)


@pytest.mark.parametrize("h,w", SIZES)
def test_weights_sum_to_one_and_ignore_the_margins(h, w):
    plan = plan_tiles(h, w, 32, overlap=12, margin=3)
    total = np.zeros((SCALE * h, SCALE * w))
    for t, wt in zip(plan.tiles, plan.weights(), strict=True):
        assert wt.shape == (SCALE * plan.tile_h, SCALE * plan.tile_w)
        assert wt.min() >= 0 and wt.max() <= 1 + 1e-6
        m = SCALE * plan.margin
        # nothing comes from within the margin of an edge shared with a neighbour
        if t.top > 0:
            assert (wt[:m] == 0).all()
        if t.left > 0:
            assert (wt[:, :m] == 0).all()
        if t.top + t.height < h:
            assert (wt[-m:] == 0).all()
        if t.left + t.width < w:
            assert (wt[:, -m:] == 0).all()
        total[t.slices(SCALE)] += wt
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_feather_is_a_linear_cross_fade():
    (a, b) = feather_weights(40, (0, 20), 24, margin=1, scale=1)
    # windows [0, 24) and [20, 40): the fade runs over [21, 23), pixel centres 21.5 and 22.5
    np.testing.assert_allclose(a[19:24], [1, 1, 0.75, 0.25, 0])
    np.testing.assert_allclose(b[:5], [0, 0.25, 0.75, 1, 1])


def _through_tiles(fn, image, plan, batch=3):
    calls = []

    def per_tile(tiles, origins):
        calls.append((len(tiles), list(origins)))
        assert tiles.shape[1:] == (1, plan.tile_h, plan.tile_w)
        for tile, (top, left) in zip(tiles[:, 0], origins, strict=True):
            np.testing.assert_array_equal(
                tile, image[top : top + plan.tile_h, left : left + plan.tile_w]
            )
        return fn(tiles)

    done = []
    out = run_tiled(per_tile, image, plan, batch=batch, progress=done.append)
    assert [n for n, _ in calls] == done and sum(done) == len(plan)
    assert all(n <= batch for n in done)
    assert [o for _, origins in calls for o in origins] == [t.origin for t in plan.tiles]
    return out


def _nearest(x):
    return np.repeat(np.repeat(x, SCALE, axis=-2), SCALE, axis=-1)


@pytest.mark.parametrize("h,w", SIZES)
def test_a_pointwise_function_comes_back_exactly(h, w):
    image = _image(h, w, seed=h * w)
    fn = lambda x: _nearest(np.sqrt(x))
    plan = plan_tiles(h, w, 24, overlap=8, margin=2)
    np.testing.assert_allclose(_through_tiles(fn, image, plan), fn(image), atol=1e-6)


@pytest.mark.parametrize("h,w", SIZES)
def test_a_local_function_comes_back_exactly(h, w):
    """Bicubic upsampling reads 2 LR pixels either side: with a margin of 2 the tiles never
    use an output that saw the tile's edge, so the blend is the whole-image result."""
    image = _image(h, w, seed=1)
    plan = plan_tiles(h, w, 24, overlap=8, margin=2)
    whole = bicubic_upsample(image)
    np.testing.assert_allclose(_through_tiles(bicubic_upsample, image, plan), whole, atol=1e-5)
    # without the margin the tile edges show: the margin is what makes it exact
    plan0 = plan_tiles(h, w, 24, overlap=8, margin=0)
    if len(plan0) > 1:
        assert np.abs(_through_tiles(bicubic_upsample, image, plan0) - whole).max() > 1e-3


def test_cut_and_blend_check_shapes():
    plan = plan_tiles(50, 40, 32)
    tiles = cut(_image(50, 40), plan)
    assert tiles.shape == (len(plan), 1, plan.tile_h, plan.tile_w)
    with pytest.raises(ValueError, match="plan"):
        cut(_image(40, 50), plan)
    with pytest.raises(ValueError, match="expected"):
        blend(tiles, plan)  # LR-sized, not 4x
    with pytest.raises(ValueError, match="tile function returned"):
        run_tiled(lambda t, o: t, _image(50, 40), plan)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"overlap": 8, "margin": 4}, "twice the margin"),
        ({"overlap": 32, "margin": 2}, "smaller than the tile"),
        ({"overlap": 8, "margin": -1}, "margin"),
    ],
)
def test_plan_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_tiles(100, 100, 32, **kwargs)
    with pytest.raises(ValueError, match="positive"):
        plan_tiles(0, 10, 32)


def test_pad_to_mirrors_up_to_the_minimum():
    x = _image(5, 30)
    y = pad_to(x, 16)
    assert y.shape == (16, 30)
    np.testing.assert_array_equal(y[:5], x)
    np.testing.assert_array_equal(y[5:10], x[::-1])  # symmetric, several passes if needed
    assert pad_to(x, 4) is not None and pad_to(x, 4).shape == (5, 30)


# --- through the real model ---------------------------------------------------------------


def _border_energy(x: np.ndarray, plan) -> np.ndarray:
    """Mean squared gradient across the tile-border lines, [across columns, across rows]:
    the step between output pixels j-1 and j where j is a tile's first or last-plus-one
    output column (row)."""
    x = x.astype(np.float64)
    out = []
    for axis, starts, tile in ((1, plan.cols, plan.tile_w), (0, plan.rows, plan.tile_h)):
        g = (np.diff(x, axis=axis) ** 2).mean(axis=1 - axis)  # g[j]: between j and j + 1
        edges = {SCALE * s for s in starts[1:]} | {SCALE * (s + tile) for s in starts[:-1]}
        out.append(g[[j - 1 for j in sorted(edges)]].mean())
    return np.array(out)


@pytest.mark.slow
def test_tiles_through_the_model_match_the_whole_image_without_seams():
    """The demo model (offline torch pipeline, the served graphs and noise) on an LR of
    96 x 96 (under the served maximum), whole and as 2 x 2 tiles of 64 with their origins:
    the tiling changes the image by under half an 8-bit grey level (rms) and by less than half
    of what the model changes in bicubic, and the gradient energy across the tile borders is
    that of the whole image there. Pasting the same tiles
    without feathering puts a visible step there (the measure can see a seam)."""
    from pydicom.data import get_testdata_file

    from cxr_sr.client.io import read_image
    from cxr_sr.imaging import bicubic_baseline, native_pair
    from cxr_sr.train import checkpoint
    from cxr_sr.train.pipeline import TorchPipeline

    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        pytest.skip("pydicom-data not installed")
    ck = checkpoint.load(Path(__file__).resolve().parents[1] / "weights" / "demo")
    pipe = TorchPipeline(ck.vae, ck.denoiser)
    _, lr = native_pair(read_image(path)[700:1084, 1300:1684])  # ribs and lung edge
    whole = pipe.super_resolve(lr[None, None], ck.schedule, ck.sampling, seed=0)[0, 0]
    plan = plan_tiles(*lr.shape, 64)
    assert len(plan) == 4

    outputs = []

    def per_tile(tiles, origins):
        out = np.concatenate(
            [
                pipe.super_resolve(t[None], ck.schedule, ck.sampling, seed=0, origin=o)
                for t, o in zip(tiles, origins, strict=True)
            ]
        )
        outputs.append(out)
        return out

    tiled = run_tiled(per_tile, lr, plan, batch=2)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))
    # under half an 8-bit grey level (about 54 dB), and well inside what the model changes
    assert rms(tiled - whole) < 0.5 / 255
    assert rms(tiled - whole) < 0.5 * rms(whole - bicubic_baseline(lr))
    excess = _border_energy(tiled, plan) / _border_energy(whole, plan)
    assert (excess < 1.15).all(), excess

    pasted = np.zeros_like(whole)  # each tile over the previous ones: hard edges
    for t, out in zip(plan.tiles, np.concatenate(outputs)[:, 0], strict=True):
        pasted[t.slices(SCALE)] = out
    assert (_border_energy(pasted, plan) / _border_energy(whole, plan) > 1.5).all()
