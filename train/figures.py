"""Figures of an evaluation: the quality-vs-steps plot and the zoomed side-by-side PNG.

``plot`` draws PSNR, SSIM and LR consistency against denoiser steps (one row per protocol);
``save_zoom_figure`` lays out zoomed regions of LR (nearest-upsampled), bicubic, SR and HR
in labelled columns with Pillow, so that the panels stay exact pixels. Used by
``cxr_sr.train.evaluate``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxr_sr.client import metrics
from cxr_sr.imaging import SCALE


def dataset_name(dataset) -> str:
    """A short name of the evaluation set: source, file, split."""
    if not isinstance(dataset, dict):
        return str(dataset)[:110]
    return " ".join(str(dataset[k]) for k in ("source", "file", "split") if dataset.get(k))


def _dataset_title(result: dict) -> str:
    """The title line of one protocol's result: protocol, scale, data set and n."""
    if result.get("title"):
        return str(result["title"])
    return f"{dataset_name(result['dataset'])}; n = {result['n_images']}"


def _protocol_results(result: dict) -> list[dict]:
    """The per-protocol results of a ``main`` JSON (``protocols``), or ``[result]`` for one
    ``evaluate`` result."""
    if "protocols" in result:
        return [r for r in result["protocols"].values() if "methods" in r]
    return [result]


def plot(result: dict, path: str | Path) -> Path | None:
    """PSNR, SSIM and LR consistency against denoiser steps, bicubic and the VAE ceiling as
    lines (PNG): one row per protocol, titled with its protocol, scale and n."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed; no plot written", file=sys.stderr)
        return None
    results = _protocol_results(result)
    keys = (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("lr_psnr", "LR consistency PSNR (dB)"))
    fig, axes = plt.subplots(
        len(results), len(keys), figsize=(12, 3.6 * len(results)), squeeze=False
    )
    for row, res in zip(axes, results, strict=True):
        m = res["methods"]
        sr = sorted((r["steps"], r) for k, r in m.items() if k.startswith("sr_"))
        steps = [s for s, _ in sr]
        for ax, (key, label) in zip(row, keys, strict=True):
            if not all(key in r for _, r in sr):
                ax.set_visible(False)
                continue
            ax.plot(steps, [r[key] for _, r in sr], "o-", label="SR (diffusion)")
            ax.axhline(m["bicubic"][key], color="gray", ls="--", label="bicubic")
            ax.axhline(m["vae_ceiling"][key], color="green", ls=":", label="VAE ceiling")
            ax.set_xscale("log", base=2)
            ax.set_xticks(steps, [str(s) for s in steps])
            ax.set_xlabel("denoiser steps")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
        row[1].set_title(_wrap(_dataset_title(res), 110), fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


# ------------------------------------------------------------------ the zoomed-region figure

ZOOM_COLUMNS = ("LR", "bicubic", "SR", "HR")
ZOOM_GAP = 4  # pixels between panels and around the grid
ZOOM_LABEL = 16  # height of a label band (column names, each row's image name)


def zoom_box(shape, center: tuple[float, float], size: int) -> tuple[int, int, int]:
    """(top, left, side) of a square crop of an HR image of ``shape`` centred at ``center``
    (row and column fractions), side ``size`` at most, all multiples of ``SCALE`` so that the
    LR crop is exactly the LR pixels under it; kept inside the image."""
    h, w = (int(v) for v in shape[-2:])
    side = min(int(size), h, w) // SCALE * SCALE
    if side < SCALE:
        raise ValueError(f"image {h}x{w} is too small for a zoom crop")
    top = int(round(center[0] * h - side / 2)) // SCALE * SCALE
    left = int(round(center[1] * w - side / 2)) // SCALE * SCALE
    top = min(max(top, 0), (h - side) // SCALE * SCALE)
    left = min(max(left, 0), (w - side) // SCALE * SCALE)
    return top, left, side


def zoom_panels(
    hr: np.ndarray, lr: np.ndarray, bicubic: np.ndarray, sr: np.ndarray, box
) -> list[np.ndarray]:
    """The four [side, side] crops LR (nearest-upsampled), bicubic, SR, HR of one image
    ([H, W] or [1, H, W] inputs; LR at 1/SCALE)."""
    top, left, side = box
    a = [np.asarray(x, dtype=np.float32).reshape(np.shape(x)[-2:]) for x in (hr, lr, bicubic, sr)]
    hr2, lr2, bic2, sr2 = a
    k = side // SCALE
    lr_crop = lr2[top // SCALE : top // SCALE + k, left // SCALE : left // SCALE + k]
    lr_up = np.repeat(np.repeat(lr_crop, SCALE, axis=0), SCALE, axis=1)

    def crop(x):
        return x[top : top + side, left : left + side]

    return [lr_up, crop(bic2), crop(sr2), crop(hr2)]


def zoom_grid(rows: Sequence[Sequence[np.ndarray]], magnify: int = 1) -> np.ndarray:
    """Rows of equal-size panels in [0, 1] as one uint8 gray image, each panel magnified
    ``magnify`` x (nearest) and a ``ZOOM_LABEL`` band above each row (for its label),
    ``ZOOM_GAP`` white pixels between and around panels. Panel ``c`` of row ``r`` lies at
    ``zoom_layout(...)[r][c]``."""
    if not rows or not rows[0]:
        raise ValueError("no panels")
    side = np.shape(rows[0][0])[-1]
    p = side * magnify
    ncol = len(rows[0])
    layout = zoom_layout(len(rows), ncol, p)
    height = layout[-1][0][0] + p + ZOOM_GAP
    width = ZOOM_GAP + ncol * (p + ZOOM_GAP)
    out = np.full((height, width), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        if len(row) != ncol:
            raise ValueError("every row needs the same number of panels")
        for c, panel in enumerate(row):
            x = np.clip(np.asarray(panel, dtype=np.float64), 0.0, 1.0)
            if x.shape != (side, side):
                raise ValueError(f"panel {r},{c} is {x.shape}, expected {(side, side)}")
            x = np.repeat(np.repeat(x, magnify, axis=0), magnify, axis=1)
            y0, x0 = layout[r][c]
            out[y0 : y0 + p, x0 : x0 + p] = np.rint(x * 255).astype(np.uint8)
    return out


def zoom_layout(nrows: int, ncols: int, panel: int, top: int = ZOOM_LABEL) -> list[list]:
    """(y, x) of each panel's top-left pixel in ``zoom_grid`` (``top``: the column-name band)."""
    step = ZOOM_LABEL + panel + ZOOM_GAP
    return [
        [(top + r * step + ZOOM_LABEL, ZOOM_GAP + c * (panel + ZOOM_GAP)) for c in range(ncols)]
        for r in range(nrows)
    ]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def save_zoom_figure(
    path: str | Path,
    rows: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str],
    title: str,
    columns: Sequence[str] = ZOOM_COLUMNS,
    magnify: int = 2,
) -> Path:
    """Write ``zoom_grid(rows, magnify)`` as a gray PNG under a title band (``title``,
    wrapped) and the column names, each row under its label. Panels are exact pixels
    (nearest magnification only); labels are drawn with Pillow's default font."""
    from PIL import Image, ImageDraw

    grid = zoom_grid(rows, magnify)
    width = grid.shape[1]
    font = _font(11)
    lines = []
    for part in title.split("\n"):
        lines += _wrap(part, max(40, width // 7)).split("\n")
    head = ZOOM_GAP + 14 * len(lines)
    canvas = np.full((head + grid.shape[0], width), 255, dtype=np.uint8)
    canvas[head:] = grid
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((ZOOM_GAP, ZOOM_GAP + 14 * i), line, fill=0, font=font)
    p = np.shape(rows[0][0])[-1] * magnify
    layout = zoom_layout(len(rows), len(columns), p, top=head + ZOOM_LABEL)
    for c, name in enumerate(columns):
        draw.text((layout[0][c][1] + 2, head + 2), name, fill=0, font=font)
    for r, label in enumerate(row_labels):
        draw.text((ZOOM_GAP, layout[r][0][0] - ZOOM_LABEL + 2), label, fill=0, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


class ZoomCollector:
    """An ``evaluate(on_batch=...)`` callback keeping the zoom crops of the first ``n`` images
    (SR at ``steps``)."""

    def __init__(self, n: int, steps: int, center=(0.4, 0.3), size: int = 128):
        self.n, self.steps, self.center, self.size = int(n), int(steps), center, int(size)
        self.rows: list[list[np.ndarray]] = []
        self.labels: list[str] = []
        self.boxes: list[list[int]] = []
        self.names: list[int] = []

    def __call__(self, indices, hr, lr, outputs) -> None:
        for j, index in enumerate(indices):
            if len(self.rows) >= self.n:
                return
            box = zoom_box(hr[j].shape, self.center, self.size)
            sr = outputs[f"sr_{self.steps}steps"][j]
            self.rows.append(zoom_panels(hr[j], lr[j], outputs["bicubic"][j], sr, box))
            p_bic = metrics.psnr(self.rows[-1][1], self.rows[-1][3])
            p_sr = metrics.psnr(self.rows[-1][2], self.rows[-1][3])
            h, w = hr[j].shape[-2:]
            self.labels.append(
                f"#{index}: HR {h}x{w}, crop rows {box[0]}-{box[0] + box[2]} cols "
                f"{box[1]}-{box[1] + box[2]}; crop PSNR bicubic {p_bic:.2f} / SR {p_sr:.2f} dB"
            )
            self.boxes.append([int(v) for v in box])
            self.names.append(int(index))


def figure_steps(steps_list: Sequence[int], default: int) -> int:
    """The SR column's step count: the checkpoint's default when evaluated, else the most."""
    return int(default) if int(default) in steps_list else int(max(steps_list))


def default_figure_path(out: str | Path) -> Path:
    """``outputs/eval.json`` -> ``outputs/eval_zoom.png`` (next to the JSON)."""
    out = Path(out)
    return out.with_name(out.stem + "_zoom.png")


def panel_magnification(collector: ZoomCollector) -> int:
    """Display magnification of the zoom panels: about 256 px per panel."""
    side = collector.rows[0][0].shape[0]
    return max(1, 256 // side)
