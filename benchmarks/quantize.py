"""What int8 would buy on this CPU: onnxruntime's static quantization of the served graphs,
timed and scored side by side with the float32 graphs.

    python -m benchmarks.quantize --repository build/model_repository_cpu

The question every CPU deployment asks: is an int8 model worth it? This script answers it for
the built repository on the machine it runs on, with onnxruntime's own tools rather than a
hand-written quantizer:

1. *Calibration inputs*: the pipeline runs in this process (``benchmarks.bench.InProcess``,
   the repository's own ``model.onnx`` files and sampling defaults) on ``--calibration`` real
   LR crops of the bundled radiograph (native scale, LR 64 and 128) and records every input
   each network was given.
2. *Quantization*: ``onnxruntime.quantization.quant_pre_process`` then ``quantize_static``,
   QDQ format, per-channel int8 weights, uint8 activations with min/max ranges from those
   inputs; Conv, MatMul and Gemm nodes, the first and last layers and the decoder's bicubic
   skip kept float32. This is ``cxr_sr.builders.quantize``, what ``builders.build
   --int8-unet`` serves. The graphs are written under ``--work-dir``.
3. *Variants*, side by side: float32, each network of ``--networks`` in int8 alone, all of
   them in int8.
4. *Quality*: every variant upscales the same crops (at other positions than the
   calibration's) or the images of ``--eval-images``, e.g. held-out radiographs; PSNR and
   SSIM against the HR, with bicubic's for scale, and the largest absolute difference from
   the float32 SR.
5. *Speed*: the whole pipeline per LR size of ``--sizes``, variants interleaved call by call
   (``--runs`` each after one warm-up), median ms per image, with the served thread setting
   (all cores, idle threads not spinning).

Prints a table with device and versions; writes ``outputs/quantize.json``. Nothing here
changes the repository.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    lr_crops,
    native_crops,
    positive_ints,
    software_versions,
    table,
    write_json,
)
from cxr_sr.builders.quantize import (
    QUANTIZED_OPS,
    calibration_lr,
    quantize,
    read_images,
    record_inputs,
)
from cxr_sr.builders.specs import NETWORKS
from cxr_sr.client.metrics import psnr, ssim
from cxr_sr.imaging import bicubic_baseline, native_pair

EVAL_SEED = 1000  # held-out crops: far from the calibration's seeds


def is_quantized(path: Path) -> bool:
    """Whether the graph at ``path`` holds quantize / dequantize nodes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node)


def image_pairs(paths: Sequence[str | Path], limit: int, max_hr_side: int = 1024) -> list:
    """Native-scale (HR, LR) pairs of the first ``limit`` images under ``paths`` (files or
    folders, any format the client reads), each centre-cropped to at most ``max_hr_side`` and
    to a multiple of 16 per side (LR sides a multiple of 4, as served)."""
    pairs = []
    for f, image in read_images(paths, limit):
        h, w = (min(n, max_hr_side) // 16 * 16 for n in image.shape)
        if h == 0 or w == 0:
            raise ValueError(f"{f}: {image.shape[0]}x{image.shape[1]} is below 16x16")
        top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
        pairs.append(native_pair(image[top : top + h, left : left + w]))
    return pairs


def variants(networks: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(label, networks in int8): float32, each network alone, then all together."""
    out = [("float32", ())] + [(f"{n} int8", (n,)) for n in networks]
    if len(networks) > 1:
        out.append(("all int8", tuple(networks)))
    return out


def pipeline(repository: Path, int8: dict[str, Path], threads: int):
    """The repository's in-process pipeline with the networks of ``int8`` swapped for their
    quantized graphs."""
    from benchmarks.bench import InProcess

    inproc = InProcess(repository, {}, threads=threads, spinning="off")
    for name, path in int8.items():
        inproc.pipe.use_graph(name, path)
    return inproc


def quality(pipes: dict[str, Any], pairs) -> dict[str, dict[str, float | None]]:
    """Mean PSNR and SSIM against the HR per variant and bicubic's, and each variant's largest
    absolute difference from the float32 SR."""
    scores: dict[str, list[tuple[float, float]]] = {k: [] for k in (*pipes, "bicubic")}
    diffs: dict[str, float | None] = {**dict.fromkeys(pipes, 0.0), "bicubic": None}
    for pair in pairs:
        lr = pair.lr[None, None].astype(np.float32)
        outs = {k: np.clip(p(lr)[0, 0], 0, 1) for k, p in pipes.items()}
        for k, sr in outs.items():
            diffs[k] = max(diffs[k], float(np.abs(sr - outs["float32"]).max()))
        outs["bicubic"] = np.clip(bicubic_baseline(pair.lr), 0, 1)
        for k, sr in outs.items():
            scores[k].append((float(psnr(sr, pair.hr)), float(ssim(sr, pair.hr))))
    return {
        k: {
            "psnr": float(np.mean([a for a, _ in v])),
            "ssim": float(np.mean([b for _, b in v])),
            "max_abs_vs_float32": diffs[k],
        }
        for k, v in scores.items()
    }


def speed(pipes: dict[str, Any], sides: Sequence[int], runs: int) -> dict[int, dict[str, float]]:
    """Median ms per image for every variant at each LR side, variants interleaved."""
    out = {}
    for side in sides:
        lr = lr_crops(side, 1, seed=EVAL_SEED + side)
        times: dict[str, list[float]] = {k: [] for k in pipes}
        for p in pipes.values():
            p(lr)  # warm-up
        for _ in range(runs):
            for k, p in pipes.items():
                t0 = time.perf_counter()
                p(lr)
                times[k].append(time.perf_counter() - t0)
        out[side] = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return out


def run(
    repository: Path,
    networks: Sequence[str],
    work_dir: Path,
    *,
    calibration: int,
    eval_crops: int,
    sides: Sequence[int],
    runs: int,
    threads: int = 0,
    eval_images: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """The whole comparison; the report's payload."""
    from cxr_sr.train.pipeline import find_graph

    for name in NETWORKS:
        if is_quantized(find_graph(repository, name)):
            raise ValueError(
                f"{repository}: {name} is already int8 (built with --int8-unet?); compare "
                "against a float32 repository"
            )
    base = pipeline(repository, {}, threads)
    t0 = time.perf_counter()
    recorded = record_inputs(base.pipe, base, calibration_lr(count=calibration), networks)
    int8 = {
        n: quantize(find_graph(repository, n), work_dir / f"{n}.int8.onnx", recorded[n])
        for n in networks
    }
    print(f"[quantize] calibrated and quantized in {time.perf_counter() - t0:.0f} s", flush=True)
    pipes = {"float32": base}
    for label, chosen in variants(networks)[1:]:
        pipes[label] = pipeline(repository, {n: int8[n] for n in chosen}, threads)
    if eval_images:
        pairs = image_pairs(eval_images, eval_crops)
    else:
        pairs = native_crops(min(sides), eval_crops, seed=EVAL_SEED)
    scores = quality(pipes, pairs)
    timings = speed(pipes, sides, runs)
    rows = []
    for label in pipes:
        row = {"variant": label, **scores[label]}
        for side, t in timings.items():
            row[f"lr{side}_ms"] = t[label]
            row[f"lr{side}_speedup"] = t["float32"] / t[label]
        rows.append(row)
    rows.append({"variant": "bicubic", **scores["bicubic"]})
    return {
        "networks": list(networks),
        "quantized_ops": list(QUANTIZED_OPS),
        "calibration_calls": {n: len(v) for n, v in recorded.items()},
        "eval": {
            "images": len(pairs),
            "source": "files" if eval_images else "bundled radiograph crops",
            "lr_sides": sorted({tuple(p.lr.shape) for p in pairs}),
        },
        "sizes": list(sides),
        "runs": runs,
        "graphs": {n: str(p) for n, p in int8.items()},
        "variants": rows,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser(
        "quantize", __doc__, "built cpu repository whose model.onnx files are quantized"
    )
    p.add_argument(
        "--networks",
        default="unet,vae_decoder",
        help="networks to quantize, comma-separated, of "
        + ", ".join(NETWORKS)
        + " (default: %(default)s; the encoder is a few ms)",
    )
    p.add_argument(
        "--calibration",
        type=int,
        default=8,
        help="LR crops whose network inputs calibrate the activation ranges, half at LR 64, "
        "half at 128 (default %(default)s)",
    )
    p.add_argument(
        "--eval-crops",
        type=int,
        default=8,
        help="held-out crops at the smallest --sizes for PSNR and SSIM, or images of "
        "--eval-images (default %(default)s)",
    )
    p.add_argument(
        "--eval-images",
        nargs="+",
        default=(),
        metavar="PATH",
        help="score on these images instead (files or folders, PNG/JPEG/TIFF/DICOM; the "
        "first --eval-crops of them, native scale, centre-cropped to at most 1024 per side), "
        "e.g. held-out radiographs of your own",
    )
    p.add_argument(
        "--sizes", type=positive_ints, default=[64, 128, 256], help="LR sides timed (64,128,256)"
    )
    p.add_argument("--runs", type=int, default=5, help="timed calls per variant and size (5)")
    p.add_argument(
        "--threads", type=int, default=0, help="intra-op threads (default 0: all cores, as served)"
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("outputs/int8"),
        help="where the quantized graphs are written (default: %(default)s)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("outputs/quantize.json"), help="JSON report (%(default)s)"
    )
    args = p.parse_args(argv)
    args.networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = [n for n in args.networks if n not in NETWORKS]
    if unknown or not args.networks:
        p.error(f"--networks must name some of {', '.join(NETWORKS)}, got {unknown or 'none'}")
    if args.calibration < 1 or args.eval_crops < 1 or args.runs < 1 or args.threads < 0:
        p.error("--calibration, --eval-crops and --runs must be >= 1, --threads >= 0")
    if not args.repository.is_dir():
        p.error(f"--repository {args.repository} is not a folder: run `make build` first")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(
            args.repository,
            args.networks,
            args.work_dir,
            calibration=args.calibration,
            eval_crops=args.eval_crops,
            sides=args.sizes,
            runs=args.runs,
            threads=args.threads,
            eval_images=args.eval_images,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    device, versions = device_info(), software_versions()
    sides = report["sizes"]
    print()
    scored = report["eval"]
    lr_sizes = ", ".join(f"{h}x{w}" for h, w in scored["lr_sides"][:3])
    print(
        f"int8 (onnxruntime static quantization, QDQ, per-channel) vs float32, in one process; "
        f"PSNR, SSIM: mean of {scored['images']} {scored['source']} (native scale, LR "
        f"{lr_sizes}{', ...' if len(scored['lr_sides']) > 3 else ''}); ms per image: median "
        f"of {args.runs} interleaved calls"
    )
    print(describe(device, versions))
    headers = ["variant", "PSNR dB", "SSIM", "max |diff|"]
    headers += [h for s in sides for h in (f"LR {s} ms", "speed-up")]
    rows = []
    for v in report["variants"]:
        diff = v["max_abs_vs_float32"]
        row = [v["variant"], v["psnr"], f"{v['ssim']:.4f}", None if diff is None else f"{diff:.3g}"]
        for s in sides:
            row += [v.get(f"lr{s}_ms"), v.get(f"lr{s}_speedup")]
        rows.append(row)
    print(table(headers, rows))
    write_json(
        args.out, {"benchmark": "int8 vs float32", "device": device, "versions": versions, **report}
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
