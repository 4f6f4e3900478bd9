"""benchmarks.quantize: onnxruntime's static int8 quantization of the served graphs, scored
and timed against the float32 graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from benchmarks import quantize


def _quantized_convs(path) -> dict[str, bool]:
    """{Conv node name: whether its weight comes through a DequantizeLinear}."""
    graph = onnx.load(str(path)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: n.input[1] in dequantized for n in graph.node if n.op_type == "Conv"}


def test_variants_cover_each_network_and_all():
    assert quantize.variants(["unet"]) == [("float32", ()), ("unet int8", ("unet",))]
    assert [label for label, _ in quantize.variants(["unet", "vae_decoder"])] == [
        "float32",
        "unet int8",
        "vae_decoder int8",
        "all int8",
    ]


def test_arguments_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        quantize.parse_args(["--repository", str(tmp_path), "--networks", "unet,vae"])
    assert "--networks must name some of vae_encoder, unet, vae_decoder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quantize.parse_args(["--repository", str(tmp_path / "missing")])
    assert "run `make build` first" in capsys.readouterr().err


def test_quantize_needs_calibration_inputs(built_repository, tmp_path):
    repo, _ = built_repository
    with pytest.raises(ValueError, match="no calibration inputs"):
        quantize.quantize(repo / "unet" / "1" / "model.onnx", tmp_path / "u.onnx", [])


def test_int8_variants_are_scored_and_timed_against_float32(built_repository, tmp_path):
    """The recorded inputs calibrate real int8 graphs (QDQ convolutions), the bicubic skip and
    the first and last layers stay float32, and every variant gets quality and speed figures
    from the same inputs; float32 is its own reference."""
    repo, _ = built_repository
    report = quantize.run(
        repo,
        ["unet", "vae_decoder"],
        tmp_path / "int8",
        calibration=2,
        eval_crops=2,
        sides=[16, 32],
        runs=1,
        threads=1,
    )
    assert (
        report["calibration_calls"]["unet"] >= 2 and report["calibration_calls"]["vae_decoder"] >= 2
    )
    decoder = _quantized_convs(report["graphs"]["vae_decoder"])
    assert decoder["/bicubic/Conv"] is False and decoder["/decoder/conv_out/Conv"] is False
    assert sum(decoder.values()) >= len(decoder) // 2  # the inner convolutions are int8
    unet = _quantized_convs(report["graphs"]["unet"])
    assert any(unet.values()) and not unet["/denoiser/unet/conv_in/Conv"]
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == ["float32", "unet int8", "vae_decoder int8", "all int8", "bicubic"]
    assert rows["float32"]["max_abs_vs_float32"] == 0.0
    assert 0.0 < rows["all int8"]["max_abs_vs_float32"] < 0.5
    for label in ("float32", "unet int8", "vae_decoder int8", "all int8"):
        row = rows[label]
        assert np.isfinite(row["psnr"]) and 0 < row["ssim"] <= 1
        assert row["lr16_ms"] > 0 and row["lr32_ms"] > 0
    assert rows["float32"]["lr16_speedup"] == 1.0
    assert "lr16_ms" not in rows["bicubic"]
    json.dumps(report)


def test_eval_images_become_native_pairs_of_served_sizes(tmp_path):
    """Files and folders of the user's own images: centre-cropped to a multiple of 16 and at
    most the largest side, HR and its 4x area-downsampled LR; an empty folder is an error."""
    from cxr_sr.client.io import write_png

    rng = np.random.default_rng(0)
    write_png(tmp_path / "a.png", rng.random((70, 90)))
    write_png(tmp_path / "b.png", rng.random((40, 40)))
    pairs = quantize.image_pairs([tmp_path], limit=5, max_hr_side=64)
    assert [p.hr.shape for p in pairs] == [(64, 64), (32, 32)]
    assert [p.lr.shape for p in pairs] == [(16, 16), (8, 8)]
    assert len(quantize.image_pairs([tmp_path / "a.png"], limit=5)) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images under"):
        quantize.image_pairs([tmp_path / "empty"], limit=5)
