"""What each sampler and step count costs and buys, at native scale.

    python -m benchmarks.samplers --checkpoint weights/demo --steps 1,2,4,8 \\
        --samplers ddim,dpmpp --early-stop 0.05,0.02

Scores the checkpoint on the held-out region of the bundled radiograph (the ``sample`` data
source's test split, as ``make eval`` does) at native scale (HR = each square at its own
pixels, LR its 4x area downsample) with ``train.evaluate.evaluate`` (the served pipeline run
offline in torch, seed 0), once per sampler over the step counts, and once per early-stop
threshold with DPM-Solver++ at the most steps (the image stops when its x0 estimate moves by
less than the threshold between two steps). Each row reports PSNR, SSIM, HFEN and LR
consistency against the image, the seconds per image and the denoiser calls per image
actually made (counted on the network: early stop makes fewer than the plan's steps). Writes
``outputs/samplers.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    positive_ints,
    software_versions,
    table,
)
from benchmarks.common import write_json as write_report
from cxr_sr.sampling import PARAMS_BY_NAME, SAMPLERS

METRICS = ("psnr", "ssim", "hfen", "lr_psnr")


def _floats(text: str) -> list[float]:
    """argparse type: comma-separated early-stop thresholds, each a valid ``early_stop``."""
    try:
        return [PARAMS_BY_NAME["early_stop"].parse(x) for x in text.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _samplers(text: str) -> list[str]:
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in SAMPLERS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"samplers must be among {', '.join(SAMPLERS)}: {text!r}")
    return names


class CallCounter:
    """Counts the rows the denoiser network sees (a forward pre-hook): denoiser calls per
    image = rows / images."""

    def __init__(self, module):
        self.rows = 0
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, module, inputs) -> None:
        self.rows += int(inputs[0].shape[0])

    def close(self) -> None:
        self._handle.remove()


def run(
    checkpoint: str | Path,
    steps: Sequence[int],
    samplers: Sequence[str],
    early_stop: Sequence[float],
    *,
    limit: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Every (sampler, steps) row and every early-stop row; the report's payload."""
    # torch and the training package: heavy, needed only by this benchmark
    from cxr_sr.train.checkpoint import load
    from cxr_sr.train.data import DataConfig, build_dataset
    from cxr_sr.train.evaluate import evaluate

    ck = load(checkpoint)
    dataset = build_dataset(DataConfig.from_dict({"source": "sample"}), split="test")
    plans = [(s, list(steps), 0.0) for s in samplers]
    plans += [("dpmpp", [max(steps)], thr) for thr in early_stop]
    rows, baselines, title = [], {}, ""
    for sampler, plan_steps, thr in plans:
        counter = CallCounter(ck.denoiser)
        try:
            result = evaluate(
                ck,
                dataset,
                plan_steps,
                options=ck.sampling.replace(sampler=sampler, early_stop=thr),
                protocol="native",
                use_lpips=False,
                limit=limit,
                seed=seed,
                device=device,
            )
        finally:
            counter.close()
        n, methods = result["n_images"], result["methods"]
        baselines = {m: methods[m] for m in ("bicubic", "vae_ceiling")}
        title = result["title"]
        if thr == 0 and counter.rows != n * sum(plan_steps):  # no early stop: every step runs
            raise RuntimeError(f"{sampler}: {counter.rows} denoiser rows for {n} x {plan_steps}")
        for k in plan_steps:
            sr = methods[f"sr_{k}steps"]
            # with early stop (one step count per run) the counted calls; else the plan's
            calls = counter.rows / n if thr else float(k)
            rows.append(
                {
                    "sampler": sampler,
                    "steps": k,
                    "early_stop": thr,
                    "calls_per_image": calls,
                    **{m: sr[m] for m in METRICS},
                    "seconds_per_image": sr["seconds_per_image"],
                }
            )
            print(
                f"[samplers] {sampler} {k} steps early_stop={thr:g}: {sr['psnr']:.2f} dB, "
                f"{calls:.1f} calls/image",
                flush=True,
            )
    return {"title": title, "baselines": baselines, "rows": rows}


def _metrics(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['psnr']:.2f}",
        f"{row['ssim']:.4f}",
        f"{row['hfen']:.3f}",
        f"{row['lr_psnr']:.2f}",
    ]


def report_rows(report: dict[str, Any]) -> list[list[Any]]:
    out = []
    for name, b in report["baselines"].items():
        out.append([name, "-", "-", "-", *_metrics(b), b["seconds_per_image"]])
    for r in report["rows"]:
        stop = f"{r['early_stop']:g}" if r["early_stop"] else "off"
        out.append(
            [
                r["sampler"],
                r["steps"],
                stop,
                r["calls_per_image"],
                *_metrics(r),
                r["seconds_per_image"],
            ]
        )
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser("samplers", __doc__)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("weights/demo"),
        help="checkpoint folder (default: %(default)s)",
    )
    p.add_argument(
        "--steps",
        type=positive_ints,
        default=[1, 2, 4, 8],
        help="step counts per sampler (default: 1,2,4,8)",
    )
    p.add_argument(
        "--samplers",
        type=_samplers,
        default=["ddim", "dpmpp"],
        help=f"samplers, comma-separated, among {', '.join(SAMPLERS)} (default: ddim,dpmpp)",
    )
    p.add_argument(
        "--early-stop",
        type=_floats,
        default=[0.05, 0.02],
        help="early-stop thresholds tried with dpmpp at the most steps (default: 0.05,0.02)",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N squares")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/samplers.json"),
        help="JSON report (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if not args.checkpoint.is_dir():
        p.error(f"--checkpoint {args.checkpoint} is not a folder")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(
        args.checkpoint,
        args.steps,
        args.samplers,
        args.early_stop,
        limit=args.limit,
        seed=args.seed,
        device=args.device,
    )
    device, versions = device_info(), software_versions()
    print()
    print(f"samplers at native scale: {report['title']}; seed {args.seed}")
    print(describe(device, versions))
    headers = ["method", "steps", "early stop", "calls/img", "PSNR", "SSIM", "HFEN", "LR PSNR"]
    print(table([*headers, "s/img"], report_rows(report)))
    write_report(
        args.out,
        {
            "benchmark": "samplers",
            "checkpoint": str(args.checkpoint),
            "seed": args.seed,
            "device": device,
            "versions": versions,
            **report,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
