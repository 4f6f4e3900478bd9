"""``cxr-sr``: super-resolve radiographs (files, folders, DICOM studies) with a Triton server.

    cxr-sr scans/ study/ one.png --out results/ --steps 4 --seed 0 --json report.json

For every input: read (``client.io.read_image``), prepare the 64 x 64 LR and, unless the
input already is an LR, the 256 x 256 reference (``client.prepare``), send the LR in
batches, write ``<stem>_sr.png`` (16-bit) under ``--out`` (folder inputs keep their
sub-folder layout), and report PSNR/SSIM of SR and of bicubic against the reference.
A bad input is reported and skipped (exit code 1 at the end); an unreachable server is one
line on stderr and exit code 2.
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

from cxr_sr.client.io import is_dicom, iter_inputs, read_image, write_dicom_sc, write_png
from cxr_sr.client.metrics import hfen, ms_ssim, psnr, ssim
from cxr_sr.client.prepare import prepare
from cxr_sr.client.report import bicubic_baseline, format_table, save_side_by_side
from cxr_sr.client.triton import (
    DEFAULT_MAX_BATCH,
    PROTOCOLS,
    SRClient,
    SRConnectionError,
    SRServerError,
)
from cxr_sr.imaging import HR_SIZE
from cxr_sr.serving import add_arguments, namespace_parameters

EXIT_OK, EXIT_INPUT_FAILED, EXIT_SERVER = 0, 1, 2

TABLE_COLUMNS = [
    ("name", "image"),
    ("size", "input"),
    ("psnr_sr", "PSNR SR", ".2f"),
    ("psnr_bicubic", "PSNR bicubic", ".2f"),
    ("ssim_sr", "SSIM SR", ".4f"),
    ("ssim_bicubic", "SSIM bicubic", ".4f"),
    ("seconds", "s/image", ".3f"),
]
_MEAN_KEYS = (
    "psnr_sr",
    "psnr_bicubic",
    "ssim_sr",
    "ssim_bicubic",
    "ms_ssim_sr",
    "ms_ssim_bicubic",
    "hfen_sr",
    "hfen_bicubic",
    "seconds",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cxr-sr",
        description="4x super-resolution of chest radiographs through a Triton server "
        "(ensemble cxr_sr). Inputs larger than 64x64 are centre-cropped, resized to the "
        "256x256 reference and 4x area-downsampled to the LR; 64x64 inputs are used as LR.",
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
        "--lr-as-is",
        action="store_true",
        help="treat every input as the LR itself (must be 64x64); no reference metrics",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="images per request (the server's max_batch_size is 8)",
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
        help="also write <stem>_compare.png: LR | bicubic | SR | reference",
    )
    p.add_argument(
        "--dicom",
        action="store_true",
        help="also write <stem>_sr.dcm, a derived Secondary Capture; DICOM inputs lend it their "
        "patient/study attributes, and all outputs of a run form one new series",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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


def _metrics(sr: np.ndarray, bic: np.ndarray, hr: np.ndarray | None) -> dict[str, float | None]:
    keys = ("psnr", "ssim", "ms_ssim", "hfen")
    if hr is None:
        return {f"{k}_{w}": None for k in keys for w in ("sr", "bicubic")}
    out: dict[str, float | None] = {}
    for k, fn in zip(keys, (psnr, ssim, ms_ssim, hfen), strict=True):
        out[f"{k}_sr"] = float(fn(sr, hr))
        out[f"{k}_bicubic"] = float(fn(bic, hr))
    return out


def _mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean: dict[str, Any] = {"name": f"mean ({len(rows)})", "size": ""}
    for k in _MEAN_KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    return mean


def _pixel_spacing(path: Path, side: int) -> tuple[float, float] | None:
    """Output pixel spacing (mm) when the source DICOM gives one; ``side`` = input square."""
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if not spacing or len(spacing) != 2 or min(float(v) for v in spacing) <= 0:
        return None
    factor = side / HR_SIZE
    return float(spacing[0]) * factor, float(spacing[1]) * factor


def _write_dicom(args: argparse.Namespace, item: dict[str, Any], sr: np.ndarray) -> None:
    source = item["path"] if is_dicom(item["path"]) else None
    spacing = None
    if source is not None:
        try:
            spacing = _pixel_spacing(source, item["side"])
        except Exception:
            source = None  # unreadable header: write without source attributes
    write_dicom_sc(
        args.out / f"{item['stem']}_sr.dcm",
        sr,
        source,
        series_uid=args.series_uid,
        instance_number=item["index"] + 1,
        pixel_spacing=spacing,
    )


def _flush(
    batch: list[dict[str, Any]],
    client: SRClient,
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    failed: list[dict[str, str]],
    log,
) -> None:
    """Send one batch, write its outputs and append its report rows."""
    if not batch:
        return
    lr = np.stack([b["lr"] for b in batch])[:, None]
    t0 = time.perf_counter()
    try:
        sr = client.super_resolve(lr, **args.sampling)
    except SRConnectionError:
        raise
    except SRServerError as e:
        for b in batch:
            failed.append({"path": str(b["path"]), "error": str(e)})
            log(f"failed: {b['path']}: {e}")
        return
    seconds = (time.perf_counter() - t0) / len(batch)
    bic = bicubic_baseline(lr)
    for i, b in enumerate(batch):
        out = write_png(args.out / f"{b['stem']}_sr.png", sr[i, 0], bits=16)
        if args.dicom:
            _write_dicom(args, b, sr[i, 0])
        if args.side_by_side:
            save_side_by_side(
                args.out / f"{b['stem']}_compare.png", b["lr"], bic[i, 0], sr[i, 0], b["hr"]
            )
        row = {
            "name": str(b["stem"]),
            "path": str(b["path"]),
            "output": str(out),
            "size": b["size"],
            **_metrics(sr[i, 0], bic[i, 0], b["hr"]),
            "seconds": seconds,
        }
        rows.append(row)
    batch.clear()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr-sr`` console script; returns the exit code."""
    from tqdm import tqdm

    args = build_parser().parse_args(argv)
    err = sys.stderr
    if args.batch < 1:
        print("cxr-sr: error: --batch must be at least 1", file=err)
        return EXIT_SERVER
    try:
        args.sampling = namespace_parameters(args)
        client = SRClient(
            args.url, args.protocol, args.model, timeout_s=args.timeout, max_batch=args.batch
        )
    except ValueError as e:
        print(f"cxr-sr: error: {e}", file=err)
        return EXIT_SERVER

    from pydicom.uid import generate_uid

    args.series_uid = generate_uid()  # one derived series per run
    with client:
        try:
            client.wait_ready(args.wait)
        except SRConnectionError as e:
            print(f"cxr-sr: error: {e}", file=err)
            return EXIT_SERVER

        failed: list[dict[str, str]] = []
        jobs = _collect(args.inputs, failed)
        for f in failed:
            print(f"failed: {f['path']}: {f['error']}", file=err)
        rows: list[dict[str, Any]] = []
        batch: list[dict[str, Any]] = []
        bar = tqdm(jobs, desc="cxr-sr", unit="image", disable=True if args.quiet else None)
        try:
            for index, (path, stem) in enumerate(bar):
                try:
                    image = read_image(path)
                    lr, hr = prepare(image, lr_as_is=args.lr_as_is)
                except ValueError as e:
                    failed.append({"path": str(path), "error": str(e)})
                    tqdm.write(f"failed: {path}: {e}", file=err)
                    continue
                batch.append(
                    {
                        "path": path,
                        "stem": stem,
                        "lr": lr,
                        "hr": hr,
                        "size": f"{image.shape[0]}x{image.shape[1]}",
                        "side": min(image.shape),
                        "index": index,
                    }
                )
                if len(batch) >= args.batch:
                    _flush(batch, client, args, rows, failed, lambda m: tqdm.write(m, file=err))
            _flush(batch, client, args, rows, failed, lambda m: tqdm.write(m, file=err))
        except SRConnectionError as e:
            bar.close()
            print(f"cxr-sr: error: {e}", file=err)
            return EXIT_SERVER
        bar.close()

    mean = _mean_row(rows) if rows else None
    if rows:
        print(format_table([*rows, mean], TABLE_COLUMNS))
        print("(metrics against the 256x256 reference; s/image = request time / batch size)")
    print(f"{len(rows)} written to {args.out}, {len(failed)} failed", file=err)
    if args.json:
        report = {
            "server": {"url": args.url, "protocol": args.protocol, "model": args.model},
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
