"""``cxr-sr``: super-resolve radiographs (files, folders, DICOM studies) with a Triton server.

    cxr-sr scans/ study/ one.png --out results/                  # upscale: 4x each image
    cxr-sr scans/ --out results/ --eval native --json report.json  # score at native scale

Default (upscale): every input is the LR. ``<stem>_sr.png`` is the 4x image at the input's
own geometry (H x W -> 4H x 4W, odd sizes included) and bit depth (8-bit inputs give 8-bit
PNGs, deeper ones and DICOM 16-bit); inputs larger than the server's maximum side are tiled
(``SRClient.upscale``). Folder inputs keep their sub-folder layout under ``--out``.

``--eval`` scores the model instead, on a degraded copy of each image with the image as
reference (``cxr_sr.imaging``, the protocols training and evaluation use):

- ``reference``: HR = the centred square resized to 256 x 256, LR = its 4x area downsample
  (64 x 64); the output is the 256 x 256 SR;
- ``native``: HR = the image at its own pixel size (cropped to a multiple of 4), LR = its 4x
  area downsample; the output is the SR at the image's size, scored at full size.

Both report PSNR/SSIM/MS-SSIM/HFEN of SR and of bicubic against the HR. Every mode reports
each result's LR consistency: the PSNR of its 4x area downsample against the LR it was made
from (``client.metrics.lr_psnr``), for the SR and for bicubic; an SR far below bicubic there
has changed the image, not only sharpened it. A bad input is reported and skipped (exit
code 1 at the end); an unreachable server is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_sr.client.io import (
    image_bits,
    is_dicom,
    iter_inputs,
    read_image,
    write_dicom_sc,
    write_png,
)
from cxr_sr.client.report import METRICS, bicubic_baseline, format_table, save_side_by_side, scores
from cxr_sr.client.triton import (
    DEFAULT_IN_FLIGHT,
    DEFAULT_MAX_BATCH,
    PROTOCOLS,
    SRClient,
    SRConnectionError,
    SRServerError,
)
from cxr_sr.imaging import PROTOCOLS as IMAGE_PROTOCOLS
from cxr_sr.imaging import SCALE, Pair, native_pair, reference_pair
from cxr_sr.serving import add_arguments, namespace_parameters

EXIT_OK, EXIT_INPUT_FAILED, EXIT_SERVER = 0, 1, 2

UPSCALE = "upscale"
EVAL_PROTOCOLS = ("reference", "native")
MODES = {
    UPSCALE: f"upscale: each input is the LR; SR = {SCALE}x its size (H x W -> "
    f"{SCALE}H x {SCALE}W), tiled where larger than the server takes",
    **{
        name: f"{name} protocol: {text}; scored at the HR's size"
        for name, text in IMAGE_PROTOCOLS.items()
    },
}
_PAIRS = {"reference": reference_pair, "native": native_pair}

LR_COLUMNS = [
    ("lr_psnr_sr", "LR PSNR SR", ".2f"),
    ("lr_psnr_bicubic", "LR PSNR bicubic", ".2f"),
    ("tiles", "tiles"),
    ("seconds", "s/image", ".3f"),
]
TABLE_COLUMNS = {
    UPSCALE: [("name", "image"), ("size", "input"), ("out_size", "output"), *LR_COLUMNS],
    "eval": [
        ("name", "image"),
        ("size", "input"),
        ("scale", "HR / LR"),
        ("psnr_sr", "PSNR SR", ".2f"),
        ("psnr_bicubic", "PSNR bicubic", ".2f"),
        ("ssim_sr", "SSIM SR", ".4f"),
        ("ssim_bicubic", "SSIM bicubic", ".4f"),
        *LR_COLUMNS,
    ],
}
_MEAN_KEYS = (
    *(f"{k}_{w}" for k in (*METRICS, "lr_psnr") for w in ("sr", "bicubic")),
    "seconds",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr-sr",
        description="4x super-resolution of chest radiographs through a Triton server "
        "(ensemble cxr_sr). By default every input is the LR and comes back 4x larger, at its "
        "own geometry and bit depth; --eval scores the model on degraded copies instead.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files (PNG, JPEG, TIFF, DICOM) or folders, searched recursively "
        "(DICOM files without suffix are found by content)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder for <stem>_sr.png")
    p.add_argument("--url", default="127.0.0.1:8000", help="Triton host:port, no scheme")
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="http",
        help="tritonclient protocol (Triton serves HTTP on 8000 and gRPC on 8001)",
    )
    p.add_argument("--model", default="cxr_sr", help="name of the served ensemble")
    add_arguments(p)  # --steps, --seed, ...: one flag per request-schema key
    p.add_argument(
        "--eval",
        choices=EVAL_PROTOCOLS,
        default=None,
        help="score instead of upscaling: 'reference' (HR = centred square resized to "
        "256x256, LR 64x64) or 'native' (HR = the image at its own size, LR = its 4x area "
        "downsample); PSNR/SSIM of SR and bicubic against the HR",
    )
    p.add_argument(
        "--in-flight",
        type=int,
        default=DEFAULT_IN_FLIGHT,
        help=f"tile requests in flight at once (default {DEFAULT_IN_FLIGHT}: the cpu target "
        "computes one batch at a time, and more only add memory; up to the server's "
        f"max_batch_size, {DEFAULT_MAX_BATCH}, on a GPU server, whose dynamic batcher merges them)",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="LR tile side for images larger than it (default: the largest side the server takes)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=None,
        help="LR pixels shared by neighbouring tiles (default: a quarter of the tile side)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per request")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        help="seconds to wait for the server to become ready before giving up",
    )
    p.add_argument("--json", type=Path, help="also write the per-image report to this JSON file")
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="also write <stem>_compare.png: LR | bicubic | SR (| HR with --eval)",
    )
    p.add_argument(
        "--dicom",
        action="store_true",
        help="also write <stem>_sr.dcm, a derived Secondary Capture; DICOM inputs lend it their "
        "patient/study attributes, and all outputs of a run form one new series",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _collect(inputs: Sequence[str], failed: list[dict[str, str]]) -> list[tuple[Path, Path]]:
    """(file, output stem relative to --out) for every input file; bad paths go to ``failed``."""
    jobs: list[tuple[Path, Path]] = []
    used: set[Path] = set()
    for arg in inputs:
        root = Path(arg)
        try:
            files = iter_inputs([root])
        except ValueError as e:
            failed.append({"path": str(root), "error": str(e)})
            continue
        for f in files:
            rel = f.relative_to(root).parent if root.is_dir() else Path()
            stem = rel / f.stem
            k = 2
            while stem in used:
                stem = rel / f"{f.stem}_{k}"
                k += 1
            used.add(stem)
            jobs.append((f, stem))
    return jobs


def _size(x: np.ndarray) -> str:
    return f"{x.shape[0]}x{x.shape[1]}"


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {"name": f"mean ({len(rows)})", "size": ""}
    for k in _MEAN_KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    return mean


def _pixel_spacing(path: Path, factor: float) -> tuple[float, float] | None:
    """Output pixel spacing (mm) when the source DICOM gives one; ``factor`` = source pixels
    per output pixel."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing or len(spacing) != 2 or min(float(v) for v in spacing) <= 0:
        return None
    return float(spacing[0]) * factor, float(spacing[1]) * factor


def _write_dicom(args: argparse.Namespace, job: dict[str, Any], sr: np.ndarray) -> None:
    source = job["path"] if is_dicom(job["path"]) else None
    spacing = None
    if source is not None:
        try:
            spacing = _pixel_spacing(source, job["spacing_factor"])
        except Exception:
            source = None  # unreadable header: write without source attributes
    write_dicom_sc(
        args.out / f"{job['stem']}_sr.dcm",
        sr,
        source,
        series_uid=args.series_uid,
        instance_number=job["index"] + 1,
        pixel_spacing=spacing,
    )


class _TileBar:
    """A progress bar over the tiles of one image, shown only when it has several."""

    def __init__(self, disable: bool | None) -> None:
        self.disable = disable
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if total <= 1:
            return
        if self.bar is None:
            self.bar = tqdm(
                total=total, desc="tiles", unit="tile", leave=False, disable=self.disable
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _job(path: Path, stem: Path, index: int, mode: str) -> dict[str, Any]:
    """Read one input and make its LR (and HR under --eval); ValueError for a bad input."""
    image = read_image(path)
    job: dict[str, Any] = {"path": path, "stem": stem, "index": index, "size": _size(image)}
    job["bits"] = image_bits(path)
    if mode == UPSCALE:
        job.update(lr=image, hr=None, scale="", spacing_factor=1.0 / SCALE)
        return job
    pair: Pair = _PAIRS[mode](image)
    per_pixel = f"1:{pair.downscale:.2f}" if pair.downscale != 1 else "native"
    job.update(
        lr=pair.lr,
        hr=pair.hr,
        scale=f"{_size(pair.hr)} / {_size(pair.lr)} ({per_pixel})",
        spacing_factor=pair.downscale,
    )
    return job


def _run_one(
    client: SRClient, args: argparse.Namespace, job: dict[str, Any], disable: bool | None
) -> dict[str, Any]:
    """Super-resolve one prepared input, write its outputs and return its report row."""
    lr = job["lr"]
    bar = _TileBar(disable)
    t0 = time.perf_counter()
    try:
        sr = client.upscale(lr, overlap=args.overlap, tile=args.tile, progress=bar, **args.sampling)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    bic = bicubic_baseline(lr)
    out = write_png(args.out / f"{job['stem']}_sr.png", sr, bits=job["bits"])
    if args.dicom:
        _write_dicom(args, job, sr)
    if args.side_by_side:
        save_side_by_side(args.out / f"{job['stem']}_compare.png", lr, bic, sr, job["hr"])
    tiles = len(client.tile_plan(*np.shape(lr), args.overlap, args.tile))
    return {
        "name": str(job["stem"]),
        "path": str(job["path"]),
        "output": str(out),
        "size": job["size"],
        "out_size": _size(sr),
        "bits": job["bits"],
        "scale": job["scale"],
        "tiles": tiles,
        **scores(sr, bic, lr, job["hr"]),
        "seconds": seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr-sr`` console script; returns the exit code."""
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    err = sys.stderr
    mode = args.eval or UPSCALE
    try:
        args.sampling = namespace_parameters(args)
        client = SRClient(
            args.url, args.protocol, args.model, timeout_s=args.timeout, in_flight=args.in_flight
        )
    except ValueError as e:
        print(f"cxr-sr: error: {e}", file=err)
        return EXIT_SERVER

    from pydicom.uid import generate_uid

    args.series_uid = generate_uid()  # one derived series per run
    disable = True if args.quiet else None  # None: tqdm shows bars on a terminal only
    with client:
        try:
            client.wait_ready(args.wait)
            limits = client.limits()
        except SRServerError as e:
            print(f"cxr-sr: error: {e}", file=err)
            return EXIT_SERVER

        failed: list[dict[str, str]] = []
        jobs = _collect(args.inputs, failed)
        for f in failed:
            print(f"failed: {f['path']}: {f['error']}", file=err)
        rows: list[dict[str, Any]] = []
        bar = tqdm(jobs, desc="cxr-sr", unit="image", disable=disable)
        try:
            for index, (path, stem) in enumerate(bar):
                try:
                    job = _job(path, stem, index, mode)
                    rows.append(_run_one(client, args, job, disable))
                except (ValueError, SRServerError) as e:
                    if isinstance(e, SRConnectionError):
                        raise
                    failed.append({"path": str(path), "error": str(e)})
                    tqdm.write(f"failed: {path}: {e}", file=err)
        except SRConnectionError as e:
            bar.close()
            print(f"cxr-sr: error: {e}", file=err)
            return EXIT_SERVER
        bar.close()

    mean = _mean_row(rows) if rows else None
    if rows:
        print(MODES[mode])
        columns = TABLE_COLUMNS[UPSCALE if mode == UPSCALE else "eval"]
        print(format_table([*rows, mean], columns))
        print(
            f"(PSNR in dB; LR PSNR = LR consistency, the {SCALE}x area downsample of the "
            f"result against the LR; server takes LR {limits.describe()}, larger are tiled)"
        )
    print(f"{len(rows)} written to {args.out}, {len(failed)} failed", file=err)
    if args.json:
        report = {
            "server": {"url": args.url, "protocol": args.protocol, "model": args.model},
            "mode": {"name": mode, "description": MODES[mode]},
            "sampling": args.sampling,
            "images": rows,
            "mean": mean,
            "failed": failed,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return EXIT_INPUT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
