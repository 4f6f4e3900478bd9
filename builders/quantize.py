"""int8 graphs for the cpu target: onnxruntime's static quantization, calibrated on real LR
inputs as the served pipeline passes them to each network.

``builders.build --int8-unet`` serves the UNet quantized this way; ``benchmarks.quantize``
scores and times every network in int8 against float32. The pieces:

- :func:`calibration_lr`: LR inputs at native scale (LR 64 and 128 crops) of the bundled
  radiograph, or of the user's own images;
- :func:`record_inputs`: every input each network receives while a pipeline upscales them;
- :func:`quantize`: ``quant_pre_process`` then ``quantize_static`` (QDQ, per-channel int8
  weights, uint8 activations with min/max ranges from the recorded inputs) on Conv, MatMul and
  Gemm, keeping float32 the nodes :data:`KEEP_FLOAT` names.

onnxruntime's tools do the work; nothing here rewrites a graph by hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
# nodes kept in float32 (substrings of their names): the decoder's bicubic(LR) skip, whose
# uint8 activations would cut a 12-16 bit radiograph to 256 levels, and every network's first
# and last layers, the usual exception
KEEP_FLOAT = ("/bicubic/", "/conv_in/", "/conv_out/", "/post_quant_conv/")
CALIBRATION_SIDES = (64, 128)  # LR sides of the calibration crops
CALIBRATION_CROPS = 8
INT8 = ".int8"  # unet.int8.onnx next to unet.onnx in the ONNX folder


def read_images(paths: Sequence[str | Path], limit: int) -> list[tuple[Path, np.ndarray]]:
    """(file, image in [0, 1]) for the first ``limit`` images under ``paths`` (files or
    folders, any format the client reads); none at all is an error."""
    from cxr_sr.client.io import iter_inputs, read_image

    files = iter_inputs(paths)[:limit]
    if not files:
        raise ValueError(f"no images under {', '.join(map(str, paths))}")
    return [(f, read_image(f)) for f in files]


def calibration_lr(
    images: Sequence[str | Path] = (), count: int = CALIBRATION_CROPS, seed: int = 0
) -> list[np.ndarray]:
    """``count`` LR inputs ``[1, 1, s, s]`` (s alternating over :data:`CALIBRATION_SIDES`): the
    4x area downsample of random ``4s`` squares of the images under ``images`` (files or
    folders, any format the client reads; by turns), or of the bundled radiograph."""
    from cxr_sr.imaging import SCALE, native_pair

    if count < 1:
        raise ValueError(f"need at least one calibration crop, got {count}")
    if images:
        sources = [image for _, image in read_images(images, count)]
    else:
        from cxr_sr.train.data.sample import load_sample

        sources = [load_sample()]  # the bundled radiograph
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        image = sources[i % len(sources)]
        hr = SCALE * CALIBRATION_SIDES[i % len(CALIBRATION_SIDES)]
        hr = min(hr, *(n // 16 * 16 for n in image.shape))
        if hr < 16:
            raise ValueError(f"calibration image {image.shape[0]}x{image.shape[1]} is below 16x16")
        top = int(rng.integers(0, image.shape[0] - hr + 1))
        left = int(rng.integers(0, image.shape[1] - hr + 1))
        lr = native_pair(image[top : top + hr, left : left + hr]).lr
        out.append(np.clip(lr, 0.0, 1.0)[None, None].astype(np.float32))
    return out


def record_inputs(
    pipe, upscale: Callable[[np.ndarray], Any], lr_batches: Sequence[np.ndarray], names
) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every input the networks ``names`` of ``pipe`` (a ``train.pipeline.OnnxPipeline``)
    receive while ``upscale`` runs on each batch: ``{name: [{input: array}, ...]}``, one entry
    per network call."""
    seen: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in names}
    plain = pipe.run

    def recording(name, *arrays):
        if name in seen:
            feeds = zip(pipe.input_names(name), arrays, strict=True)
            seen[name].append({k: np.array(v, copy=True) for k, v in feeds})
        return plain(name, *arrays)

    pipe.run = recording
    try:
        for lr in lr_batches:
            upscale(lr)
    finally:
        pipe.run = plain
    return seen


class _Feeds:
    """onnxruntime's ``CalibrationDataReader`` protocol over recorded feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def float_nodes(path: Path, keep: Sequence[str]) -> list[str]:
    """The quantizable nodes of the graph at ``path`` whose names contain one of ``keep``."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        n.name for n in graph.node if n.op_type in QUANTIZED_OPS and any(k in n.name for k in keep)
    ]


def quantize(
    src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], keep: Sequence[str] = KEEP_FLOAT
) -> Path:
    """``src`` quantized statically to int8 (QDQ, per-channel weights) at ``dst``, its
    activation ranges calibrated on ``feeds``; nodes named with one of ``keep`` stay float."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise ValueError(f"{src}: no calibration inputs recorded")
    dst.parent.mkdir(parents=True, exist_ok=True)
    prepared = dst.with_name(dst.stem + ".pre.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(prepared),
            str(dst),
            _Feeds(feeds),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(QUANTIZED_OPS),
            nodes_to_exclude=float_nodes(prepared, keep),
        )
    finally:
        prepared.unlink(missing_ok=True)
    return dst


def int8_unet(
    onnx: dict[str, Path],
    checkpoint: Path,
    onnx_dir: Path,
    images: Sequence[str | Path] = (),
    count: int = CALIBRATION_CROPS,
    force: bool = False,
) -> Path:
    """The build stage behind ``--int8-unet``: ``unet.int8.onnx`` in ``onnx_dir``, the graph
    the cpu target serves (the fused one where there is one) quantized with ranges from the
    float pipeline (``onnx``'s graphs, the checkpoint's schedule and sampling defaults)
    upscaling :func:`calibration_lr`. Cached on the source graph, the calibration crops' pixels
    and onnxruntime's version."""
    import onnxruntime

    from cxr_sr import SamplingOptions, Schedule
    from cxr_sr.train.pipeline import OnnxPipeline

    src = onnx.get("unet.fused") or onnx["unet"]
    dst = onnx_dir / f"unet{INT8}.onnx"
    stamp = dst.with_suffix(".json")
    lr = calibration_lr(images, count)
    key = hashlib.sha256(src.read_bytes())  # the graph, the calibration pixels, the tool
    for x in lr:
        key.update(x.tobytes())
    key.update(onnxruntime.__version__.encode())
    fresh = dst.is_file() and stamp.is_file()
    if fresh and not force and json.loads(stamp.read_text()).get("key") == key.hexdigest():
        print(f"[int8] {dst} is up to date")
        return dst
    meta = json.loads((checkpoint / "cxr_sr.json").read_text())
    schedule = Schedule.load(checkpoint / "scheduler")
    options = SamplingOptions(**meta["sampling"])
    pipe = OnnxPipeline(onnx_dir, threads=0, spinning="off")
    recorded = record_inputs(pipe, lambda x: pipe.super_resolve(x, schedule, options), lr, ["unet"])
    quantize(src, dst, recorded["unet"])
    stamp.write_text(
        json.dumps(
            {
                "key": key.hexdigest(),
                "source": src.name,
                "calibration": [str(p) for p in images] or ["bundled radiograph"],
                "calibration_crops": count,
                "calls": len(recorded["unet"]),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"[int8] {dst}: the UNet in int8, calibrated on {len(recorded['unet'])} calls")
    return dst
