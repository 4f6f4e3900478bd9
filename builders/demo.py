"""The demo: serve the built repository, super-resolve the bundled chest radiograph.

    python -m cxr_sr.builders.demo --repository build/model_repository_cpu --checkpoint weights/demo

The radiograph is pydicom-data's RG1_UNCI.dcm (1955 x 1841). The demo model was trained on
crops of its left three quarters; the right quarter is held out. Two protocols, both from
``cxr_sr.imaging`` (the definitions the client, training and evaluation use):

  * native scale (``native_pair``): HR = the whole radiograph at its own pixels (cropped to
    a multiple of 4: 1952 x 1840), LR = its 4x area downsample (488 x 460), super-resolved
    back to 1952 x 1840 through ``SRClient.upscale``: one request if the server takes
    488 x 460, else overlapping tiles blended with feathered weights. PSNR/SSIM of SR and
    bicubic at full size, LR consistency, and a side-by-side PNG of a zoomed region in the
    held-out quarter (LR | bicubic | SR | HR);
  * reference (``reference_pair``): HR = centred square resized to 256 x 256, LR 64 x 64;
    ``RG1 whole`` (a 7.19x downscale) and ``RG1 held-out k``, the held-out quarter as 5
    squares of 460 px (``train.data`` source "sample", split "test").

Prints one table per protocol, each titled with its scale, and writes the figures to
``outputs/demo.json``, the zoom to ``outputs/demo_side_by_side.png`` and the whole native
SR to ``outputs/demo_sr.png`` (16-bit).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from cxr_sr.builders.serve import TritonServer
from cxr_sr.client import SRClient, format_table, read_image, save_side_by_side, write_png
from cxr_sr.client.report import scores
from cxr_sr.client.triton import DEFAULT_IN_FLIGHT
from cxr_sr.imaging import PROTOCOLS, SCALE, bicubic_baseline, native_pair, reference_pair

# The zoom of the side-by-side, in LR pixels of the native protocol (top, left, side): ribs
# crossing the lung edge in the held-out right quarter (LR columns 345 and up).
ZOOM = (150, 350, 96)
COLUMNS = [
    ("image", "image"),
    ("psnr_sr", "PSNR SR", ".2f"),
    ("psnr_bicubic", "PSNR bicubic", ".2f"),
    ("ssim_sr", "SSIM SR", ".4f"),
    ("ssim_bicubic", "SSIM bicubic", ".4f"),
    ("lr_psnr_sr", "LR PSNR SR", ".2f"),
    ("lr_psnr_bicubic", "LR PSNR bicubic", ".2f"),
    ("tiles", "tiles"),
    ("seconds", "s/image", ".2f"),
]
_MEAN_KEYS = ("psnr_sr", "psnr_bicubic", "ssim_sr", "ssim_bicubic", "lr_psnr_sr")
_MEAN_KEYS = (*_MEAN_KEYS, "lr_psnr_bicubic", "seconds")


def radiograph() -> np.ndarray:
    """The bundled radiograph, float32 [1955, 1841] in [0, 1] (bone bright)."""
    from pydicom.data import get_testdata_file

    return read_image(get_testdata_file("RG1_UNCI.dcm"))


def reference_images(image: np.ndarray) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], str]:
    """(name, lr [64, 64], hr [256, 256]) for the whole radiograph and the held-out squares,
    and the scale of these images in words."""
    from cxr_sr.train.data import DataConfig, build_dataset

    pair = reference_pair(image)
    images = [("RG1 whole", pair.lr, pair.hr)]
    held_out = build_dataset(DataConfig(source="sample"), "test")
    for k in range(len(held_out)):
        hr_k, lr_k = held_out[k]
        images.append((f"RG1 held-out {k}", lr_k.numpy()[0], hr_k.numpy()[0]))
    note = f"RG1 whole: a {pair.downscale:.2f}x downscale; RG1 held-out: {held_out.scale_note()}"
    return images, note


def score(
    client: SRClient, name: str, lr: np.ndarray, hr: np.ndarray, tile: int | None = None, **params
) -> dict:
    """One row: ``client.upscale(lr)`` timed, scored against ``hr`` (and the SR as ``_sr``)."""
    t0 = time.perf_counter()
    sr = client.upscale(lr, tile=tile, **params)
    seconds = time.perf_counter() - t0
    row = {"image": name, **scores(sr, bicubic_baseline(lr), lr, hr)}
    tiles = len(client.tile_plan(*lr.shape, tile=tile))
    return {**row, "tiles": tiles, "seconds": seconds, "_sr": sr}


def mean_row(rows: list[dict], name: str) -> dict:
    return {
        "image": f"{name} (mean of {len(rows)})",
        **{k: float(np.mean([r[k] for r in rows])) for k in _MEAN_KEYS},
    }


def zoom_panels(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray, box=ZOOM):
    """(lr, bicubic, sr, hr) crops of the zoom ``box`` (LR top, left, side), moved and
    shrunk to fit inside the image."""
    side = min(box[2], *lr.shape)
    top = min(max(box[0], 0), lr.shape[0] - side)
    left = min(max(box[1], 0), lr.shape[1] - side)
    lo = slice(top, top + side), slice(left, left + side)
    hi = tuple(slice(SCALE * s.start, SCALE * s.stop) for s in lo)
    return lr[lo], bicubic_baseline(lr)[hi], sr[hi], hr[hi]


def _clean(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("build/model_repository_cpu"),
        help="built cpu-target repository (default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("weights/demo"),
        help="checkpoint the repository was built from (recorded in the JSON)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="sampling steps (default: the checkpoint's default)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        help="LR tile side for the whole radiograph (default: the server's maximum side)",
    )
    p.add_argument(
        "--in-flight",
        type=int,
        default=DEFAULT_IN_FLIGHT,
        help="tile requests in flight (default %(default)s: the cpu target computes one batch "
        "at a time, and more in flight only add memory)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs"),
        help="where demo.json and the PNGs go (default: %(default)s)",
    )
    args = p.parse_args(argv)

    image = radiograph()
    native = native_pair(image)
    references, reference_note = reference_images(image)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"starting tritonserver on {args.repository} ...", flush=True)
    sampling = {"steps": args.steps, "seed": args.seed}
    with (
        TritonServer(args.repository, log_file=args.out / "triton.log") as server,
        SRClient(server.http_url, in_flight=args.in_flight) as client,
    ):
        client.wait_ready(60)
        limits = client.limits()
        client.upscale(references[0][1], **sampling)  # warm-up
        plan = client.tile_plan(*native.lr.shape, tile=args.tile)
        print(
            f"super-resolving the whole radiograph: LR {native.lr.shape[0]}x"
            f"{native.lr.shape[1]} as {len(plan)} tile(s) of {plan.tile_h}x{plan.tile_w} "
            f"(the server takes LR {limits.describe()}) ...",
            flush=True,
        )
        whole = score(client, "RG1 whole", native.lr, native.hr, args.tile, **sampling)
        ref_rows = [score(client, n, lr, hr, **sampling) for n, lr, hr in references]

    h, w = native.hr.shape
    titles = {
        "native": f"Native scale: HR = the whole radiograph at its own pixels ({h}x{w}), "
        f"LR = 4x area downsample ({h // SCALE}x{w // SCALE}), scored at full size",
        "reference": "Reference protocol: HR = centred square resized to 256x256, LR 64x64 "
        f"({reference_note})",
    }
    ref_summary = [ref_rows[0], mean_row(ref_rows[1:], "RG1 held-out")]
    for name, rows in (("native", [whole]), ("reference", ref_summary)):
        print(f"\n{titles[name]}")
        print(format_table(_clean(rows), COLUMNS))
    print(
        "PSNR in dB; LR PSNR = LR consistency (PSNR of the result's 4x area downsample against "
        "the LR); s/image = client.upscale wall time, CPU target"
    )

    side_by_side = args.out / "demo_side_by_side.png"
    save_side_by_side(side_by_side, *zoom_panels(native.lr, whole["_sr"], native.hr))
    sr_png = write_png(args.out / "demo_sr.png", whole["_sr"], bits=16)
    report = {
        "checkpoint": str(args.checkpoint),
        "steps": args.steps,
        "seed": args.seed,
        "server_lr_sides": [limits.min_side, limits.max_side],
        "tile": [plan.tile_h, plan.tile_w],
        "requests_in_flight": args.in_flight,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "protocols": {
            "native": {
                "title": titles["native"],
                "definition": PROTOCOLS["native"],
                "zoom_lr_box": list(ZOOM),
                "images": _clean([whole]),
            },
            "reference": {
                "title": titles["reference"],
                "definition": PROTOCOLS["reference"],
                "images": _clean(ref_rows),
                "summary": _clean(ref_summary),
            },
        },
    }
    (args.out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out / 'demo.json'}, {side_by_side} (zoom: LR | bicubic | SR | HR)")
    print(f"and {sr_png} (the whole SR, {h}x{w})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
