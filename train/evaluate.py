"""Offline evaluation of a checkpoint on a held-out set: bicubic, the VAE ceiling, and SR at
several step counts, at the reference protocol and at native scale.

    python -m cxr_sr.train.evaluate --checkpoint runs/demo/checkpoint --data sample --split test \\
        --backend torch --steps 1,2,4,8 --out outputs/eval.json --plot outputs/quality_vs_steps.png

The pipeline is the served one (``train.pipeline``): z_lr = vae.encode_lr(LR) ->
``cxr_sr.sample`` over the denoiser -> vae.decode, with the torch modules or onnxruntime
sessions (``--backend onnx``).

Protocols (``--protocol reference|native|both``, default both; ``cxr_sr.imaging.PROTOCOLS``):

- ``reference``: the dataset's items, HR = the whole image (or the held-out square) resized to
  ``hr_size`` (256), LR = 4x area downsample (``cxr_sr.imaging.reference_pair``), as the
  client and the demo.
- ``native``: HR = the same image (NIH: the 1024 x 1024 file; the bundled radiograph: each
  held-out square) at its own pixel size, centre-cropped to a multiple of
  ``NATIVE_MULTIPLE`` (16: the LR side must be a multiple of 4 for the VAE), LR = 4x area
  downsample (``cxr_sr.imaging.native_pair``); scored at full size, one image at a time, at
  most ``--native-limit`` images. A ``cache`` source holds no native images: ``both`` then
  runs the reference protocol only.

Metrics come from ``client.metrics`` (PSNR, SSIM, MS-SSIM, HFEN) on [0, 1] images, bicubic =
``cxr_sr.imaging.bicubic_baseline``, plus ``lr_psnr`` (``client.metrics.lr_psnr``): the PSNR
of the 4x area downsample of each output against the LR input, the LR consistency (bicubic's
value is the reference point; an SR well below it changed the image at LR scale, i.e.
invented or removed content). LPIPS (Zhang et al. 2018) only when the ``lpips`` package and
its backbone weights are already on disk. Seconds per image are wall time of the whole batch
/ N.

``--figure`` writes a side-by-side PNG of zoomed regions (LR nearest-upsampled, bicubic, SR,
HR; ``--zoom`` / ``--zoom-size``) of the first ``--figure-images`` images, at the native
protocol when it ran (else reference); ``--plot`` the quality-vs-steps plot, one row per
protocol. Every title, and the JSON (``protocols.<name>.title``), names protocol and scale.
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

from cxr_sr import SAMPLERS, SamplingOptions
from cxr_sr.client import metrics
from cxr_sr.imaging import PROTOCOLS, SCALE, bicubic_baseline, native_pair
from cxr_sr.train.figures import (
    ZOOM_COLUMNS,
    ZoomCollector,
    dataset_name,
    default_figure_path,
    figure_steps,
    panel_magnification,
    plot,
    save_zoom_figure,
)
from cxr_sr.train.pipeline import OnnxPipeline, TorchPipeline

METRICS = ("psnr", "ssim", "ms_ssim", "hfen", "lr_psnr")
PROTOCOL_CHOICES = ("reference", "native", "both")
NATIVE_MULTIPLE = 16  # native HR side: LR a multiple of 4 (the VAE decoder halves twice)
NATIVE_LIMIT = 40  # default --native-limit: images scored at native scale


def _scores(pred: np.ndarray, hr: np.ndarray, lr: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image metrics of [N, 1, H, W] arrays in [0, 1] (``lr``: the input, [N, 1, H/4, W/4])."""
    return {
        "psnr": np.atleast_1d(metrics.psnr(pred, hr)),
        "ssim": np.atleast_1d(metrics.ssim(pred, hr)),
        "ms_ssim": np.atleast_1d(metrics.ms_ssim(pred, hr)),
        "hfen": np.atleast_1d(metrics.hfen(pred, hr)),
        "lr_psnr": np.atleast_1d(metrics.lr_psnr(pred, lr, SCALE)),
    }


def native_image(dataset, index: int) -> np.ndarray:
    """Item ``index`` of ``dataset`` at its own pixel size, before any resizing: float32 [H, W].

    The bundled radiograph: the item's square of the native image (``dataset.box``); NIH,
    DICOM and image folders: the decoded file; phantoms: the phantom as drawn. A ``cache``
    source keeps only reference pairs: ValueError.
    """
    if hasattr(dataset, "box") and hasattr(dataset, "image"):  # train.data.sample
        return np.asarray(dataset.box(index).cut(dataset.image), dtype=np.float32)
    if hasattr(dataset, "path"):  # train.data.nih.ImageFiles
        from cxr_sr.client.io import read_image

        decoded = getattr(dataset, "_decoded", {}).get(index % len(dataset.names))
        return decoded if decoded is not None else read_image(dataset.path(index))
    if type(dataset).__name__ == "PhantomPairs":  # the phantom of PhantomPairs.load_hr
        from cxr_sr.train.data.pairs import SPLITS
        from cxr_sr.train.data.phantom import chest_phantom

        key = np.random.default_rng([dataset.seed, SPLITS.index(dataset.split), index])
        return chest_phantom(dataset.size, key)
    raise ValueError(
        f"{type(dataset).__name__} keeps no native-scale images (a prepared cache holds "
        "reference pairs only): use --protocol reference, or the source folder"
    )


def has_native(dataset) -> bool:
    """Whether ``native_image`` can read this dataset's images."""
    return (
        (hasattr(dataset, "box") and hasattr(dataset, "image"))
        or hasattr(dataset, "path")
        or type(dataset).__name__ == "PhantomPairs"
    )


def native_item(dataset, index: int, multiple: int = NATIVE_MULTIPLE, image=None):
    """``cxr_sr.imaging.native_pair`` of the native image (``image``, else
    ``native_image(dataset, index)``) centre-cropped to a multiple of ``multiple`` per axis:
    (hr [1, H, W], lr [1, H/4, W/4]) float32."""
    image = native_image(dataset, index) if image is None else image
    h, w = image.shape
    hh, ww = h - h % multiple, w - w % multiple
    if hh == 0 or ww == 0:
        raise ValueError(f"image {h}x{w} is smaller than {multiple}x{multiple}")
    top, left = (h - hh) // 2, (w - ww) // 2
    pair = native_pair(image[top : top + hh, left : left + ww], SCALE)
    return pair.hr[None], pair.lr[None]


class NativeView:
    """``dataset`` seen through the native protocol: item i = ``native_item(dataset, i)``."""

    def __init__(self, dataset, multiple: int = NATIVE_MULTIPLE):
        self.dataset, self.multiple = dataset, multiple
        self.shapes: dict[int, tuple[tuple[int, int], tuple[int, int]]] = {}  # image, HR

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image = native_image(self.dataset, index)
        hr, lr = native_item(self.dataset, index, self.multiple, image)
        self.shapes[index] = (tuple(image.shape), tuple(hr.shape[-2:]))
        return hr, lr

    def name(self, index: int) -> str:
        return self.dataset.name(index)

    def describe(self) -> dict:
        describe = getattr(self.dataset, "describe", None)
        d = dict(describe()) if callable(describe) else {"source": type(self.dataset).__name__}

        def sizes(shapes) -> str:
            seen = sorted({(int(h), int(w)) for h, w in shapes})
            if len(seen) > 3:  # e.g. a DICOM folder: the range only
                seen = [seen[0], seen[-1]]
            return " .. ".join(f"{h}x{w}" for h, w in seen) or "?"

        shapes = list(self.shapes.values())
        images, hr = sizes(s[0] for s in shapes), sizes(s[1] for s in shapes)
        lr = sizes((h // SCALE, w // SCALE) for _, (h, w) in shapes)
        cropped = "" if images == hr else f", centre-cropped to a multiple of {self.multiple}"
        d["scale"] = (
            f"native scale (1 HR px = 1 image px): images {images}{cropped} -> HR {hr}, "
            f"LR {lr} ({SCALE}x area)"
        )
        return d


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
    protocol: str = "reference",
    on_batch: Callable | None = None,
) -> dict:
    """Score bicubic, the VAE ceiling and SR at each step count on ``dataset``.

    Args:
        checkpoint: a checkpoint folder or a loaded ``train.checkpoint.Checkpoint``.
        dataset: items (hr [1, H, W], lr [1, H/4, W/4]) float32 in [0, 1].
        steps_list: denoiser calls per image to try, e.g. (1, 2, 4, 8).
        backend: ``torch`` or ``onnx`` (needs ``onnx_dir``; the VAE ceiling still uses torch).
        options: sampling plan (steps replaced per entry); default: the checkpoint's.
        protocol: ``reference`` scores the dataset's items as they are; ``native`` scores
            ``native_item(dataset, i)`` (the image at its own pixel size), one image at a time.
        on_batch: called as ``on_batch(indices, hr, lr, outputs)`` after each batch, with
            ``outputs`` = {method name: [B, 1, H, W]} (the zoom figure collects its crops so).
    Returns:
        {"methods": {name: {metric: mean, metric + "_std": std, "seconds_per_image": s}},
         "n_images", "protocol", "protocol_note", "scale", "title", "backend", "sampling",
         "dataset", "lpips"}; names are ``bicubic``, ``vae_ceiling`` and ``sr_<k>steps``;
        metrics ``psnr``, ``ssim``, ``ms_ssim``, ``hfen``, ``lr_psnr`` (and ``lpips``).
    """
    from cxr_sr.train import checkpoint as ckpt_mod

    _check_args(backend, onnx_dir, steps_list)
    if protocol not in ("reference", "native"):
        raise ValueError(f"protocol must be reference or native, got {protocol!r}")
    if protocol == "native":
        dataset = dataset if isinstance(dataset, NativeView) else NativeView(dataset)
        batch_size = 1  # full-size images: one at a time bounds the memory
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
        outputs[name] = pred
        s = _scores(pred, hr, lr)
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
        outputs: dict[str, np.ndarray] = {}

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
        if on_batch is not None:
            on_batch(list(range(start, start + len(items))), hr, lr, outputs)

    methods = {name: _summary(name, scores[name], seconds[name] / n) for name in names}
    describe = getattr(dataset, "describe", None)
    described = describe() if callable(describe) else type(dataset).__name__
    scale = _scale_note(described, protocol, hr.shape[-2:])
    return {
        "checkpoint": str(checkpoint) if not isinstance(checkpoint, ckpt_mod.Checkpoint) else "",
        "backend": backend,
        "device": str(device),
        "protocol": protocol,
        "protocol_note": PROTOCOLS[protocol],
        "scale": scale,
        "title": f"{protocol} protocol, {scale}; {dataset_name(described)}; n = {n}",
        "n_images": n,
        "dataset": described,
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
        ("lr_psnr", "LR PSNR dB", ".2f"),
    ]
    if any("lpips" in r for r in rows):
        cols.append(("lpips", "LPIPS", ".4f"))
    cols.append(("seconds_per_image", "s/image", ".3f"))
    return format_table(rows, cols)


def _scale_note(dataset, protocol: str, hr_shape) -> str:
    """The scale of the figures in words (the dataset's own note when it gives one)."""
    if isinstance(dataset, dict) and dataset.get("scale"):
        return str(dataset["scale"])
    h, w = (int(v) for v in hr_shape)
    if protocol == "native":
        return f"native scale: HR {h}x{w}, LR {h // SCALE}x{w // SCALE}"
    return (
        f"whole image (centred square) resized to HR {h}x{w}, LR {h // SCALE}x{w // SCALE} "
        f"({SCALE}x area)"
    )


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
        "--protocol",
        default="both",
        choices=PROTOCOL_CHOICES,
        help="reference (HR resized to hr_size), native (HR = the image at its own size) or "
        "both (default; a cache source has no native images and runs reference only)",
    )
    p.add_argument(
        "--native-limit",
        type=int,
        default=NATIVE_LIMIT,
        help=f"score at most N images at native scale (default {NATIVE_LIMIT}; 0: no limit)",
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
        "--native-steps",
        default=None,
        help="step counts scored at native scale (default: --steps); a full-size image costs "
        "16x the reference protocol's pixels at NIH's 1024 px, so `make eval NIH=...` sweeps the "
        "steps at the reference protocol and scores native scale at the default step count",
    )
    p.add_argument(
        "--sampler",
        default=None,
        choices=SAMPLERS,
        help="sampler (default: the checkpoint's)",
    )
    p.add_argument(
        "--early-stop",
        type=float,
        default=None,
        help="stop an image once its x0 estimate changes by less than this (relative) between "
        "steps; 0 = off (default: the checkpoint's)",
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
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (reference)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--no-lpips", action="store_true", help="skip LPIPS even when available")
    p.add_argument("--out", default="outputs/eval.json", help="JSON results path")
    p.add_argument("--plot", default=None, help="quality-vs-steps PNG path (needs matplotlib)")
    p.add_argument(
        "--figure",
        default=None,
        help="side-by-side PNG of zoomed regions (LR, bicubic, SR, HR); default: next to "
        "--out (eval.json -> eval_zoom.png); 'none' to skip",
    )
    p.add_argument(
        "--figure-images", type=int, default=3, help="images (rows) in --figure (default 3)"
    )
    p.add_argument(
        "--figure-steps",
        type=int,
        default=None,
        help="SR steps shown in --figure (default: the checkpoint's, if in --steps, else the most)",
    )
    p.add_argument(
        "--zoom",
        default="0.4,0.3",
        metavar="ROW,COL",
        help="zoom centre as fractions of the HR image's height and width (default 0.4,0.3: "
        "the image-left lung field of a PA chest)",
    )
    p.add_argument(
        "--zoom-size", type=int, default=128, help="zoom crop side in HR pixels (default 128)"
    )
    return p.parse_args(argv)


def _parse_zoom(text: str) -> tuple[float, float]:
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--zoom must be ROW,COL fractions, got {text!r}") from None
    if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
        raise SystemExit(f"--zoom fractions must be in [0, 1], got {text!r}")
    return y, x


def _protocols(choice: str, dataset) -> tuple[list[str], str | None]:
    """The protocols to run and, when ``both`` had to drop native, why."""
    if choice != "both":
        if choice == "native" and not has_native(dataset):
            try:
                native_image(dataset, 0)
            except ValueError as err:
                raise SystemExit(f"--protocol native: {err}") from None
        return [choice], None
    if has_native(dataset):
        return ["reference", "native"], None
    return ["reference"], f"{type(dataset).__name__} keeps no native-scale images"


def main(argv: list[str] | None = None) -> int:
    from cxr_sr.train.config import _set_path, parse_override
    from cxr_sr.train.data import DataConfig, build_dataset

    args = parse_args(argv)
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
        native_steps = [int(s) for s in (args.native_steps or args.steps).split(",") if s.strip()]
    except ValueError:
        raise SystemExit(
            f"--steps / --native-steps must be comma-separated integers, got {args.steps!r} / "
            f"{args.native_steps!r}"
        ) from None
    zoom = _parse_zoom(args.zoom)
    fields: dict = {"source": args.data}
    if args.root:
        fields["root"] = args.root
    for item in args.set:
        key, value = parse_override(item)
        _set_path(fields, key, value)
    dataset = build_dataset(DataConfig.from_dict(fields), split=args.split)
    protocols, dropped = _protocols(args.protocol, dataset)
    from cxr_sr.train.checkpoint import load

    ck = load(args.checkpoint)
    changes = {
        k: v
        for k, v in (
            ("sampler", args.sampler),
            ("start", args.start),
            ("strength", args.strength),
            ("eta", args.eta),
            ("early_stop", args.early_stop),
        )
        if v is not None
    }
    options = ck.sampling.replace(**changes)
    fig_protocol = protocols[-1]  # native when it runs: the zoom shows real pixels
    fig_list = native_steps if fig_protocol == "native" else steps
    fig_steps = args.figure_steps or figure_steps(fig_list, options.steps)
    if fig_steps not in fig_list:
        raise SystemExit(
            f"--figure-steps {fig_steps} is not one of the {fig_protocol} protocol's steps "
            f"{fig_list}"
        )
    figure = None if str(args.figure).lower() == "none" else args.figure
    figure = default_figure_path(args.out) if args.figure is None else figure
    collector = ZoomCollector(args.figure_images, fig_steps, zoom, args.zoom_size)

    result: dict = {
        "checkpoint": str(args.checkpoint),
        "backend": args.backend,
        "steps": steps,
        "protocols": {},
    }
    if dropped:
        result["protocols"]["native"] = {"skipped": dropped}
    for protocol in protocols:
        limit = args.limit
        if protocol == "native" and args.native_limit:
            limit = min(args.native_limit, limit or args.native_limit)
        try:
            res = evaluate(
                ck,
                dataset,
                native_steps if protocol == "native" else steps,
                backend=args.backend,
                onnx_dir=args.onnx_dir,
                batch_size=args.batch_size,
                device=args.device,
                seed=args.seed,
                options=options,
                use_lpips=not args.no_lpips,
                limit=limit,
                progress=True,
                protocol=protocol,
                on_batch=collector if figure and protocol == fig_protocol else None,
            )
        except Exception as err:  # e.g. 64x64-only ONNX graphs at native size
            if protocol != "native" or args.backend != "onnx" or args.protocol == "native":
                raise
            print(f"native protocol skipped: {err}", file=sys.stderr)
            result["protocols"]["native"] = {"skipped": f"{type(err).__name__}: {err}"}
            fig_protocol = "reference"
            continue
        res["checkpoint"] = str(args.checkpoint)
        if protocol == "native" and limit is not None and limit < len(dataset):
            res["native_limit"] = limit
        result["protocols"][protocol] = res
        print(f"{res['title']}; LPIPS: {res['lpips']}")
        print(table(res))
    if dropped:
        print(f"native protocol not run: {dropped}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if figure and collector.rows:
        res = result["protocols"][fig_protocol]
        title = (
            f"Zoomed {collector.rows[0][0].shape[0]} px HR regions at ({zoom[0]:.2f}, "
            f"{zoom[1]:.2f}) of the HR image, shown {panel_magnification(collector)}x; columns: LR "
            f"(nearest), bicubic, SR ({fig_steps} step{'s' if fig_steps > 1 else ''}), HR\n"
            f"{res['title']}"
        )
        written = save_zoom_figure(
            figure, collector.rows, collector.labels, title, magnify=panel_magnification(collector)
        )
        result["figure"] = {
            "path": str(written),
            "protocol": fig_protocol,
            "scale": res["scale"],
            "title": title,
            "steps": fig_steps,
            "zoom_center": list(zoom),
            "images": collector.names,
            "boxes_top_left_side": collector.boxes,
            "columns": list(ZOOM_COLUMNS),
        }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if result.get("figure"):
        print(f"wrote {result['figure']['path']}")
    if args.plot:
        written = plot(result, args.plot)
        if written:
            print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
