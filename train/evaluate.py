"""Offline evaluation of a checkpoint on a held-out set: bicubic, the VAE ceiling, and SR at
several step counts.

    python -m cxr_sr.train.evaluate --checkpoint runs/demo/checkpoint --data sample --split test \\
        --backend torch --steps 1,2,4,8 --out outputs/eval.json --plot outputs/quality_vs_steps.png

The pipeline is the served one (``train.pipeline``): z_lr = vae.encode_lr(LR) ->
``cxr_sr.sample`` over the denoiser -> vae.decode, with the torch modules or onnxruntime
sessions (``--backend onnx``).
Metrics come from ``client.metrics`` (PSNR, SSIM, MS-SSIM, HFEN), on [0, 1] images at the
dataset's HR size, the pairs made by ``cxr_sr.imaging`` (the reference protocol, as the
client and the demo), bicubic = ``cxr_sr.imaging.bicubic_baseline``; LPIPS (Zhang et al.
2018) only when the ``lpips`` package and its backbone weights are already on disk. Seconds
per image are wall time of the whole batch / N.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from cxr_sr.client import metrics
from cxr_sr.train.pipeline import OnnxPipeline, TorchPipeline

from cxr_sr import SamplingOptions
from cxr_sr.imaging import bicubic_baseline

METRICS = ("psnr", "ssim", "ms_ssim", "hfen")


def _scores(pred: np.ndarray, hr: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image metrics of [N, 1, H, W] arrays in [0, 1]."""
    return {
        "psnr": np.atleast_1d(metrics.psnr(pred, hr)),
        "ssim": np.atleast_1d(metrics.ssim(pred, hr)),
        "ms_ssim": np.atleast_1d(metrics.ms_ssim(pred, hr)),
        "hfen": np.atleast_1d(metrics.hfen(pred, hr)),
    }


def lpips_scorer(device: torch.device | str = "cpu") -> tuple[Callable | None, str]:
    """An LPIPS (AlexNet) scorer when the package and every weight are local, else a reason."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, "lpips package not installed"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-*.pth")):
        return None, f"AlexNet weights not in {hub} (no downloads at run time)"
    import lpips

    net = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    @torch.no_grad()
    def score(pred: np.ndarray, hr: np.ndarray) -> np.ndarray:
        a = torch.from_numpy(pred).to(device).repeat(1, 3, 1, 1) * 2 - 1
        b = torch.from_numpy(hr).to(device).repeat(1, 3, 1, 1) * 2 - 1
        return net(a, b).flatten().cpu().numpy()

    return score, "alex"


def _check_args(backend: str, onnx_dir, steps_list: Sequence[int]) -> None:
    if backend not in ("torch", "onnx"):
        raise ValueError(f"backend must be torch or onnx, got {backend!r}")
    if backend == "onnx" and onnx_dir is None:
        raise ValueError("backend onnx needs onnx_dir (a builders output folder)")
    if not steps_list:
        raise ValueError("steps_list is empty")


def _summary(name: str, scores: dict[str, list], seconds_per_image: float) -> dict[str, float]:
    """Mean and std of each metric of one method, its time per image (and its step count)."""
    row: dict[str, float] = {}
    for k, v in scores.items():
        row[k] = float(np.mean(v))
        row[k + "_std"] = float(np.std(v))
    row["seconds_per_image"] = seconds_per_image
    if name.startswith("sr_"):
        row["steps"] = int(name[3:-5])
    return row


def evaluate(
    checkpoint,
    dataset,
    steps_list: Sequence[int],
    *,
    backend: str = "torch",
    onnx_dir: str | Path | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    seed: int = 0,
    options: SamplingOptions | None = None,
    use_lpips: bool = True,
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    """Score bicubic, the VAE ceiling and SR at each step count on ``dataset``.

    Args:
        checkpoint: a checkpoint folder or a loaded ``train.checkpoint.Checkpoint``.
        dataset: items (hr [1, H, W], lr [1, H/4, W/4]) float32 in [0, 1].
        steps_list: denoiser calls per image to try, e.g. (1, 2, 4, 8).
        backend: ``torch`` or ``onnx`` (needs ``onnx_dir``; the VAE ceiling still uses torch).
        options: sampling plan (steps replaced per entry); default: the checkpoint's.
    Returns:
        {"methods": {name: {metric: mean, metric + "_std": std, "seconds_per_image": s}},
         "n_images", "backend", "sampling", "dataset", "lpips"}; names are ``bicubic``,
        ``vae_ceiling`` and ``sr_<k>steps``.
    """
    from cxr_sr.train import checkpoint as ckpt_mod

    _check_args(backend, onnx_dir, steps_list)
    ck = checkpoint if isinstance(checkpoint, ckpt_mod.Checkpoint) else ckpt_mod.load(checkpoint)
    device = torch.device(device)
    rvae, denoiser = ck.vae.to(device).eval(), ck.denoiser.to(device).eval()
    options = options or ck.sampling
    pipe = OnnxPipeline(onnx_dir) if backend == "onnx" else TorchPipeline(rvae, denoiser, device)
    lp, lp_note = lpips_scorer(device) if use_lpips else (None, "disabled")

    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 1:
        raise ValueError("the evaluation set is empty")
    names = ["bicubic", "vae_ceiling"] + [f"sr_{k}steps" for k in steps_list]
    scores: dict[str, dict[str, list]] = {m: {} for m in names}
    seconds = dict.fromkeys(names, 0.0)

    def add(name: str, pred: np.ndarray, hr: np.ndarray, took: float) -> None:
        s = _scores(pred, hr)
        if lp is not None:
            s["lpips"] = lp(pred, hr)
        for k, v in s.items():
            scores[name].setdefault(k, []).extend(np.asarray(v, dtype=np.float64).tolist())
        seconds[name] += took

    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="evaluate")
    for start in batches:
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        hr = np.stack([np.asarray(it[0], dtype=np.float32) for it in items])
        lr = np.stack([np.asarray(it[1], dtype=np.float32) for it in items])
        lr_t = torch.from_numpy(lr).to(device)

        t0 = time.perf_counter()
        bic = bicubic_baseline(lr)
        add("bicubic", bic, hr, time.perf_counter() - t0)

        t0 = time.perf_counter()
        with torch.no_grad():
            ceil = rvae.decode(rvae.encode_image(torch.from_numpy(hr).to(device)), lr_t)
        add("vae_ceiling", ceil.float().cpu().numpy(), hr, time.perf_counter() - t0)

        for k in steps_list:
            opts = options.replace(steps=int(k))
            t0 = time.perf_counter()
            sr = pipe.super_resolve(lr, ck.schedule, opts, seed=seed)
            add(f"sr_{k}steps", np.asarray(sr, dtype=np.float32), hr, time.perf_counter() - t0)

    methods = {name: _summary(name, scores[name], seconds[name] / n) for name in names}
    describe = getattr(dataset, "describe", None)
    return {
        "checkpoint": str(checkpoint) if not isinstance(checkpoint, ckpt_mod.Checkpoint) else "",
        "backend": backend,
        "device": str(device),
        "n_images": n,
        "dataset": describe() if callable(describe) else type(dataset).__name__,
        "sampling": {**options.__dict__, "seed": seed},
        "lpips": lp_note,
        "methods": methods,
    }


def table(result: dict) -> str:
    """The results as text (``client.report.format_table``)."""
    from cxr_sr.client.report import format_table

    rows = [{"method": name, **row} for name, row in result["methods"].items()]
    cols = [
        ("method", "method"),
        ("psnr", "PSNR dB", ".2f"),
        ("ssim", "SSIM", ".4f"),
        ("ms_ssim", "MS-SSIM", ".4f"),
        ("hfen", "HFEN", ".4f"),
    ]
    if any("lpips" in r for r in rows):
        cols.append(("lpips", "LPIPS", ".4f"))
    cols.append(("seconds_per_image", "s/image", ".3f"))
    return format_table(rows, cols)


def _dataset_title(dataset) -> str:
    """A short line naming the evaluation set and its scale."""
    if not isinstance(dataset, dict):
        return str(dataset)[:110]
    name = " ".join(str(dataset[k]) for k in ("source", "file", "split") if dataset.get(k))
    return f"{name}: {dataset['scale']}" if dataset.get("scale") else name


def plot(result: dict, path: str | Path) -> Path | None:
    """PSNR and SSIM against denoiser steps, bicubic and the VAE ceiling as lines (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; no plot written", file=sys.stderr)
        return None
    m = result["methods"]
    sr = sorted((r["steps"], r) for k, r in m.items() if k.startswith("sr_"))
    steps = [s for s, _ in sr]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        ax.plot(steps, [r[key] for _, r in sr], "o-", label="SR (diffusion)")
        ax.axhline(m["bicubic"][key], color="gray", ls="--", label="bicubic")
        ax.axhline(m["vae_ceiling"][key], color="green", ls=":", label="VAE ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("denoiser steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{_dataset_title(result['dataset'])}, n = {result['n_images']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cxr_sr.train.evaluate", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (train.checkpoint)")
    p.add_argument(
        "--data", default="sample", help="data source (train.data SOURCES) for the evaluation set"
    )
    p.add_argument("--root", default=None, help="data folder for nih/dicom/folder/cache sources")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="which split to score (default: the held-out test split)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra DataConfig field, e.g. --set n_eval_images=100 (repeatable)",
    )
    p.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "onnx"],
        help="run the denoiser in torch or in onnxruntime",
    )
    p.add_argument(
        "--onnx-dir",
        default=None,
        help="folder with vae_encoder/unet/vae_decoder ONNX graphs (--backend onnx)",
    )
    p.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    p.add_argument(
        "--sampler",
        default=None,
        choices=["ddim", "ddpm"],
        help="sampler (default: the checkpoint's)",
    )
    p.add_argument(
        "--start",
        default=None,
        choices=["noise", "lr"],
        help="start from pure noise or the noised LR latent (default: checkpoint's)",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help="SDEdit strength in (0, 1] (default: the checkpoint's)",
    )
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default: checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS even when available")
    p.add_argument("--out", default="outputs/eval.json", help="JSON results path")
    p.add_argument("--plot", default=None, help="quality-vs-steps PNG path (needs matplotlib)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from cxr_sr.train.config import _set_path, parse_override
    from cxr_sr.train.data import DataConfig, build_dataset

    args = parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--steps must be comma-separated integers, got {args.steps!r}") from None
    fields: dict = {"source": args.data}
    if args.root:
        fields["root"] = args.root
    for item in args.set:
        key, value = parse_override(item)
        _set_path(fields, key, value)
    dataset = build_dataset(DataConfig.from_dict(fields), split=args.split)
    from cxr_sr.train.checkpoint import load

    ck = load(args.checkpoint)
    changes = {
        k: v
        for k, v in (
            ("sampler", args.sampler),
            ("start", args.start),
            ("strength", args.strength),
            ("eta", args.eta),
        )
        if v is not None
    }
    options = ck.sampling.replace(**changes)
    result = evaluate(
        ck,
        dataset,
        steps,
        backend=args.backend,
        onnx_dir=args.onnx_dir,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        options=options,
        use_lpips=not args.no_lpips,
        limit=args.limit,
        progress=True,
    )
    result["checkpoint"] = str(args.checkpoint)
    print(
        f"{_dataset_title(result['dataset'])}; n = {result['n_images']}; LPIPS: {result['lpips']}"
    )
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if args.plot:
        written = plot(result, args.plot)
        if written:
            print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
