"""The demo: serve the built repository, super-resolve the bundled chest radiograph.

    python -m cxr_sr.builders.demo --repository build/model_repository_cpu --checkpoint weights/demo

Images (the reference protocol, ``cxr_sr.imaging.reference_pair``: HR = centred square
resized to 256x256 with the antialiased bilinear filter, LR = 4x area downsample; the one
definition the client, training and evaluation use):
  * ``RG1 whole``: the whole radiograph (pydicom-data's RG1_UNCI.dcm) centre-cropped and
    resized to 256. The demo model was trained on crops of its left three quarters.
  * ``RG1 held-out k``: the right quarter of the image, never seen in training, as 5
    squares of 460 px resized to 256 (``train.data`` source "sample", split "test").
Prints a table (PSNR/SSIM of SR and bicubic, seconds per image), writes the same figures
to ``outputs/demo.json`` and a side-by-side PNG (LR | bicubic | SR | HR).
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
from cxr_sr.client import SRClient, format_table, psnr, read_image, save_side_by_side, ssim
from cxr_sr.client.report import bicubic_baseline
from cxr_sr.imaging import PROTOCOLS, reference_pair


def demo_images() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, lr [64,64], hr [256,256]) for the whole radiograph and the held-out strip."""
    from pydicom.data import get_testdata_file

    from cxr_sr.train.data import DataConfig, build_dataset

    hr, lr = reference_pair(read_image(get_testdata_file("RG1_UNCI.dcm")))
    images = [("RG1 whole", lr, hr)]
    held_out = build_dataset(DataConfig(source="sample"), "test")
    for k in range(len(held_out)):
        hr_k, lr_k = held_out[k]
        images.append((f"RG1 held-out {k}", lr_k.numpy()[0], hr_k.numpy()[0]))
    return images


def run(client: SRClient, images, steps: int | None, seed: int) -> list[dict]:
    client.super_resolve(images[0][1][None, None], steps=steps, seed=seed)  # warm-up
    rows = []
    for name, lr, hr in images:
        t0 = time.perf_counter()
        sr = client.super_resolve(lr[None, None], steps=steps, seed=seed)[0, 0]
        seconds = time.perf_counter() - t0
        bic = bicubic_baseline(lr)
        rows.append(
            {
                "image": name,
                "psnr_sr": psnr(sr, hr),
                "psnr_bicubic": psnr(bic, hr),
                "ssim_sr": ssim(sr, hr),
                "ssim_bicubic": ssim(bic, hr),
                "seconds": seconds,
                "_sr": sr,
            }
        )
    return rows


def summarize(rows: list[dict], prefix: str) -> dict:
    sel = [r for r in rows if r["image"].startswith(prefix)]
    keys = ("psnr_sr", "psnr_bicubic", "ssim_sr", "ssim_bicubic", "seconds")
    return {
        "image": f"{prefix} (mean of {len(sel)})",
        **{k: float(np.mean([r[k] for r in sel])) for k in keys},
    }


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
        "--out",
        type=Path,
        default=Path("outputs"),
        help="where demo.json and the side-by-side PNG go (default: %(default)s)",
    )
    args = p.parse_args(argv)

    images = demo_images()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"starting tritonserver on {args.repository} ...", flush=True)
    with (
        TritonServer(args.repository, log_file=args.out / "triton.log") as server,
        SRClient(server.http_url) as client,
    ):
        rows = run(client, images, args.steps, args.seed)
    whole = rows[0]
    summary = [whole, summarize(rows, "RG1 held-out")]
    columns = [
        ("image", "image"),
        ("psnr_sr", "PSNR SR", ".2f"),
        ("psnr_bicubic", "PSNR bicubic", ".2f"),
        ("ssim_sr", "SSIM SR", ".4f"),
        ("ssim_bicubic", "SSIM bicubic", ".4f"),
        ("seconds", "s/image", ".3f"),
    ]
    print(
        "\nHR 256x256, LR 64x64 (4x area downsample); PSNR in dB; seconds per image "
        "(one HTTP request, CPU target)"
    )
    print(
        format_table(
            [{k: v for k, v in r.items() if not k.startswith("_")} for r in summary], columns
        )
    )
    save_side_by_side(
        args.out / "demo_side_by_side.png",
        images[0][1],
        bicubic_baseline(images[0][1]),
        whole["_sr"],
        images[0][2],
    )
    report = {
        "checkpoint": str(args.checkpoint),
        "steps": args.steps,
        "seed": args.seed,
        "protocol": PROTOCOLS["reference"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "images": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
        "summary": [{k: v for k, v in r.items() if not k.startswith("_")} for r in summary],
    }
    (args.out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out / 'demo.json'} and {args.out / 'demo_side_by_side.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
