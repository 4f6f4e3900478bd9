"""Ablation: variants trained on the same data with the same budget, scored alike.

    python -m cxr_sr.train.ablate --config train/configs/nih.yaml --out runs/ablation \
        --set data.root=<folder holding images/> --vae-steps 400 --unet-steps 500
    python -m cxr_sr.train.ablate --only diffusion,regression --unet-steps 100   # a subset

Every variant starts from ``--config`` with ``--vae-steps`` / ``--unet-steps``, the ``--set``
overrides given to all (e.g. a smaller batch for a CPU budget) and its own overrides. The
reference row, ``diffusion``, is the config as it is. Variants that change only the denoiser
share one VAE and LR encoder (the ``vae`` run, trained once and loaded as ``pretrained_vae``),
so their rows differ in the denoiser alone. Variants that change the data or the VAE train
their own VAE and denoiser (``own_vae``); VAE-only variants report the VAE's round-trip
ceiling (the bound for any denoiser on top of it). Sampling variants re-use a trained
denoiser and change only the sampling plan. Each row is scored by ``train.evaluate`` on the
config's held-out test split (reference protocol) with one seed, at every ``--steps``; a
finished run is re-used (delete its folder to redo it). Results go to ``<out>/ablation.json``
and a Markdown table to stdout and ``<out>/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cxr_sr import SamplingOptions


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    overrides: tuple[str, ...] = ()
    vae_only: bool = False  # a VAE change: own VAE, ceiling only
    own_vae: bool = False  # a data or VAE change: own VAE and own denoiser
    sampling_of: str | None = None  # re-use this variant's denoiser; change only sampling
    sampling: dict = field(default_factory=dict)


VARIANTS = (
    Variant("diffusion", "the config as it is (latent diffusion, x0 prediction + pixel term)"),
    Variant(
        "regression",
        "same UNet, one pass from z_lr to the clean latent (no noise, no schedule)",
        ("unet.regression=true", "schedule.prediction=x0"),
    ),
    Variant("unet_medium", "UNet channels [32, 64, 128]", ("unet.model.channels=[32,64,128]",)),
    Variant("unet_small", "UNet channels [16, 32, 64]", ("unet.model.channels=[16,32,64]",)),
    Variant(
        "unet_linear",
        "UNet without its mid-block attention (every network linear in pixels)",
        ("unet.model.mid_attention=false",),
    ),
    Variant(
        "vae_attention",
        "VAE with whole-latent mid-block self-attention (the first version's); own VAE",
        ("vae.model.mid_attention=true",),
        own_vae=True,
    ),
    Variant(
        "one_radiograph",
        "trained on one radiograph (the bundled RG1, its left 75%) instead of the data set",
        ("data.source=sample",),
        own_vae=True,
    ),
    Variant(
        "lr_start",
        "diffusion, sampling from the LR latent noised to strength 0.5 (SDEdit)",
        sampling_of="diffusion",
        sampling={"start": "lr", "strength": 0.5},
    ),
    Variant(
        "plain_vae",
        "plain VAE (decoder predicts the image, not the residual over bicubic)",
        ("vae.model.residual=false", "vae.zero_init_decoder=false"),
        vae_only=True,
    ),
)
NAMES = tuple(v.name for v in VARIANTS)


def _train(config: str, out: Path, overrides: list[str], progress: bool) -> Path:
    from cxr_sr.train.config import load_config
    from cxr_sr.train.loop import run_training

    final = out / "checkpoint"
    if (final / "cxr_sr.json").is_file():
        print(f"[ablate] re-using {final}")
        return final
    cfg = load_config(config, [*overrides, f"out={out}"])
    got = run_training(cfg, resume=(out / "state" / "state.pt").is_file(), progress=progress)
    if got is None:
        raise RuntimeError(f"training in {out} stopped early")
    return got


def run(
    config: str,
    out: Path,
    only: list[str],
    vae_steps: int,
    unet_steps: int,
    steps: list[int],
    seed: int,
    progress: bool,
    common: tuple[str, ...] = (),
) -> dict:
    from cxr_sr.train import checkpoint as ckpt
    from cxr_sr.train.config import load_config
    from cxr_sr.train.data import build_dataset
    from cxr_sr.train.evaluate import evaluate

    budget = [f"vae.steps={vae_steps}", f"unet.steps={unet_steps}", *common]
    base = load_config(config, list(common))
    test_set = build_dataset(base.data, split="test")
    chosen = [v for v in VARIANTS if v.name in only]
    needs = {v.sampling_of for v in chosen if v.sampling_of}
    chosen = [v for v in VARIANTS if v.name in needs and v not in chosen] + chosen

    shared_vae: list[str] = []  # overrides that load the shared VAE and LR encoder
    if any(not (v.vae_only or v.own_vae or v.sampling_of) for v in chosen):
        shared = _train(config, out / "vae", [*budget, "unet.steps=0"], progress)
        scaling = ckpt.load(shared).vae.scaling
        shared_vae = [f"pretrained_vae={shared}", f"pretrained_scaling={scaling!r}"]
    rows, trained = [], {}
    for v in chosen:
        if v.sampling_of:
            folder = trained[v.sampling_of]
        else:
            extra = list(budget) + list(v.overrides)
            if v.vae_only:
                extra.append("unet.steps=0")
            elif not v.own_vae:
                extra += shared_vae
            folder = trained[v.name] = _train(config, out / v.name, extra, progress)
        if v.name not in only:
            continue
        ck = ckpt.load(folder)
        options: SamplingOptions = ck.sampling.replace(**v.sampling)
        result = evaluate(
            ck,
            test_set,
            [1] if v.vae_only else steps,  # VAE-only: the ceiling row is what counts
            seed=seed,
            options=options,
            use_lpips=False,
        )
        m = result["methods"]
        row = {
            "variant": v.name,
            "what": v.what,
            "bicubic_psnr": m["bicubic"]["psnr"],
            "bicubic_ssim": m["bicubic"]["ssim"],
            "ceiling_psnr": m["vae_ceiling"]["psnr"],
            "ceiling_ssim": m["vae_ceiling"]["ssim"],
            "sampling": dict(options.__dict__),
            "sr": {},
        }
        if not v.vae_only:
            row["sr"] = {
                str(k): {"psnr": m[f"sr_{k}steps"]["psnr"], "ssim": m[f"sr_{k}steps"]["ssim"]}
                for k in steps
            }
        rows.append(row)
        print(
            f"[ablate] {v.name}: ceiling {row['ceiling_psnr']:.2f} dB; "
            + ", ".join(
                f"{k} steps {s['psnr']:.2f} dB / {s['ssim']:.4f}" for k, s in row["sr"].items()
            )
        )
    return {
        "config": config,
        "overrides": list(common),
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "seed": seed,
        "dataset": test_set.describe() if hasattr(test_set, "describe") else "",
        "n_images": len(test_set),
        "rows": rows,
    }


def markdown(result: dict, steps: list[int]) -> str:
    head = ["variant", "what", "VAE ceiling PSNR / SSIM"]
    head += [f"SR {k} step{'s' if k > 1 else ''} PSNR / SSIM" for k in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["variant"], r["what"], f"{r['ceiling_psnr']:.2f} / {r['ceiling_ssim']:.4f}"]
        for k in steps:
            s = r["sr"].get(str(k))
            cells.append(f"{s['psnr']:.2f} / {s['ssim']:.4f}" if s else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if result["rows"]:
        r = result["rows"][0]
        lines.append(
            f"| bicubic | | {r['bicubic_psnr']:.2f} / {r['bicubic_ssim']:.4f} |" + " |" * len(steps)
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cxr_sr.train.ablate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="train/configs/demo.yaml", help="base YAML config")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"), help="run folder")
    p.add_argument(
        "--only",
        default=",".join(NAMES),
        help=f"comma-separated variants (default: all of {', '.join(NAMES)})",
    )
    p.add_argument("--vae-steps", type=int, default=300, help="VAE steps of every variant")
    p.add_argument("--unet-steps", type=int, default=300, help="denoiser steps of every variant")
    p.add_argument("--steps", default="1,2,4", help="comma-separated sampling step counts")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every variant, e.g. --set unet.batch_size=16 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(NAMES)}")
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        p.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    result = run(
        args.config,
        args.out,
        only,
        args.vae_steps,
        args.unet_steps,
        steps,
        args.seed,
        not args.no_progress,
        tuple(args.set),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result, steps)
    (args.out / "ablation.md").write_text(table + "\n")
    print(
        f"{result['dataset']}; n = {result['n_images']}; VAE {args.vae_steps} + UNet "
        f"{args.unet_steps} steps per variant"
        + (f"; every variant with {' '.join(args.set)}" if args.set else "")
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
