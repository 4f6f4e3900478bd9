"""cxr_sr.imaging: one bicubic (numpy = torch = ONNX Resize; the decoder graph's convolution form
is tested in test_builders), one antialiased
resize (numpy = torch's antialias=True), and the HR/LR protocols every user calls."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_sr import imaging
from cxr_sr.imaging import (
    PROTOCOLS,
    area_downsample,
    bicubic_baseline,
    bicubic_upsample,
    native_pair,
    reference_hr,
    reference_pair,
    resize,
)

ODD_SIZES = [(7, 13), (33, 17), (1, 5), (64, 64), (45, 29)]


def _torch_resize(x: np.ndarray, size: tuple[int, int], mode: str, antialias: bool) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=size, mode=mode, antialias=antialias, align_corners=False)
    return out[0, 0].numpy()


# --- one bicubic ------------------------------------------------------------------------


class _Bicubic(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False)


@pytest.fixture(scope="module")
def onnx_bicubic(tmp_path_factory: pytest.TempPathFactory):
    """The bicubic upsample as torch exports it (ONNX ``Resize``, cubic), in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    path = Path(tmp_path_factory.mktemp("onnx")) / "bicubic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as builders
        torch.onnx.export(
            _Bicubic().eval(),
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "y": {0: "n", 2: "H", 3: "W"}},
            opset_version=17,
            dynamo=False,
        )
    import onnx

    (resize_node,) = [n for n in onnx.load(str(path)).graph.node if n.op_type == "Resize"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in resize_node.attribute}
    assert attrs["mode"] == b"cubic" and attrs["coordinate_transformation_mode"] == b"half_pixel"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("size", ODD_SIZES)
def test_bicubic_numpy_torch_onnx_agree(size: tuple[int, int], onnx_bicubic) -> None:
    rng = np.random.default_rng(sum(size))
    x = rng.random((2, 1, *size)).astype(np.float32)
    ours = bicubic_upsample(x, 4)
    ref = F.interpolate(torch.from_numpy(x), scale_factor=4, mode="bicubic", align_corners=False)
    ref = ref.numpy()
    onnx_out = onnx_bicubic(x)
    assert ours.shape == ref.shape == onnx_out.shape == (2, 1, size[0] * 4, size[1] * 4)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(onnx_out, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours, onnx_out, atol=1e-5, rtol=0)


def test_bicubic_baseline_is_the_clipped_upsample() -> None:
    x = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    up = bicubic_upsample(x)
    base = bicubic_baseline(x)
    assert base.shape == (3, 256, 256) and base.dtype == np.float32
    assert up.min() < 0.0 or up.max() > 1.0  # bicubic overshoots on noise ...
    np.testing.assert_array_equal(base, np.clip(up, 0.0, 1.0))  # ... the baseline clips


# --- one antialiased resize -------------------------------------------------------------


@pytest.mark.parametrize("mode", imaging.FILTERS)
@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ((461, 459), (256, 256)),  # the held-out squares' 1.8x reduction, odd sizes
        ((1955, 1841), (256, 256)),  # the whole radiograph, non-square, ~7x
        ((37, 53), (11, 29)),  # odd reductions
        ((17, 9), (61, 40)),  # enlarging (the filter is not widened)
        ((33, 300), (33, 7)),  # one axis unchanged
    ],
)
def test_resize_matches_torch_antialias(mode: str, src, dst) -> None:
    x = np.random.default_rng(src[0]).random(src).astype(np.float32)
    ours = resize(x, *dst, filter=mode)
    ref = _torch_resize(x, dst, mode, antialias=True)
    assert ours.shape == dst and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_resize_batches_keeps_constants_and_checks() -> None:
    x = np.random.default_rng(1).random((2, 3, 50, 70)).astype(np.float32)
    out = resize(x, 20, 30)
    assert out.shape == (2, 3, 20, 30)
    np.testing.assert_allclose(out[1, 2], resize(x[1, 2], 20, 30), atol=1e-7)
    np.testing.assert_allclose(resize(np.full((99, 77), 0.3, np.float32), 40), 0.3, atol=1e-6)
    same = np.random.default_rng(2).random((8, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize(same, 8, 8), same)
    with pytest.raises(ValueError, match="filter"):
        resize(same, 4, filter="lanczos")


# --- the protocols ----------------------------------------------------------------------


def test_reference_pair_shapes_and_scale() -> None:
    image = np.random.default_rng(3).random((600, 711)).astype(np.float32)
    pair = reference_pair(image)
    hr, lr = pair  # unpacks as (hr, lr)
    assert hr is pair.hr and lr is pair.lr
    assert hr.shape == (256, 256) and lr.shape == (64, 64)
    assert hr.dtype == np.float32 and lr.dtype == np.float32
    assert pair.factor == 4 and pair.protocol == "reference"
    assert pair.downscale == pytest.approx(600 / 256)
    assert hr.min() >= 0.0 and hr.max() <= 1.0
    np.testing.assert_array_equal(lr, area_downsample(hr, 4))
    # HR = the centred 600 x 600 square (columns 55:655), antialiased bilinear to 256
    square = image[:, 55:655]
    want = np.clip(_torch_resize(square, (256, 256), "bilinear", antialias=True), 0, 1)
    np.testing.assert_allclose(hr, want, atol=1e-5, rtol=0)
    # other sizes and factors keep the bookkeeping
    p2 = reference_pair(image, size=128, scale=2)
    assert p2.hr.shape == (128, 128) and p2.lr.shape == (64, 64) and p2.factor == 2
    assert p2.downscale == pytest.approx(600 / 128)


def test_reference_hr_refuses_to_enlarge_and_keeps_constants() -> None:
    with pytest.raises(ValueError, match="at least 256"):
        reference_hr(np.zeros((100, 300), np.float32))
    with pytest.raises(ValueError, match="shape"):
        reference_hr(np.zeros((2, 300, 300), np.float32))
    np.testing.assert_allclose(reference_hr(np.full((512, 700), 0.3, np.float32)), 0.3, atol=1e-6)
    exact = np.random.default_rng(4).random((256, 256)).astype(np.float32)
    np.testing.assert_array_equal(reference_hr(exact), exact)


@pytest.mark.parametrize("shape", [(1955, 1841), (256, 256), (65, 66), (8, 11)])
def test_native_pair_crops_at_most_three_pixels(shape: tuple[int, int]) -> None:
    image = np.random.default_rng(5).random(shape).astype(np.float32)
    pair = native_pair(image)
    hr, lr = pair
    h, w = shape
    assert hr.shape == (h - h % 4, w - w % 4)
    assert 0 <= h - hr.shape[0] <= 3 and 0 <= w - hr.shape[1] <= 3
    assert lr.shape == (hr.shape[0] // 4, hr.shape[1] // 4)
    assert pair.factor == 4 and pair.downscale == 1.0 and pair.protocol == "native"
    assert hr.dtype == np.float32 and lr.dtype == np.float32
    top, left = (h % 4) // 2, (w % 4) // 2  # centred crop
    np.testing.assert_array_equal(hr, image[top : top + hr.shape[0], left : left + hr.shape[1]])
    np.testing.assert_array_equal(lr, area_downsample(hr, 4))
    with pytest.raises(ValueError):
        native_pair(np.zeros((3, 40), np.float32))


def test_every_user_calls_the_core_protocol() -> None:
    """The client, the training pairs and the benchmarks make the same HR/LR."""
    from cxr_sr.client.prepare import prepare, to_reference_hr
    from cxr_sr.client.report import bicubic_baseline as client_baseline
    from cxr_sr.train.data.pairs import reference_hr as train_reference_hr
    from cxr_sr.train.data.pairs import resize as train_resize

    image = np.random.default_rng(6).random((300, 411)).astype(np.float32)
    hr, lr = reference_pair(image)
    lr_c, hr_c = prepare(image)
    np.testing.assert_array_equal(hr_c, hr)
    np.testing.assert_array_equal(lr_c, lr)
    np.testing.assert_array_equal(to_reference_hr(image), hr)
    np.testing.assert_array_equal(train_reference_hr(image, 256), hr)
    # training crops: the same antialiased filter (torch's, as before), clipped to [0, 1]
    crop = image[:, :300] * 1.2
    want = np.clip(_torch_resize(crop, (256, 256), "bilinear", antialias=True), 0, 1)
    np.testing.assert_allclose(train_resize(crop, 256), want, atol=1e-5, rtol=0)
    assert client_baseline is bicubic_baseline
    assert "reference_pair" in PROTOCOLS["reference"] and "native_pair" in PROTOCOLS["native"]
