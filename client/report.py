"""Side-by-side figures and plain-text tables for the demo and the CLI."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxr_sr.client.metrics import hfen, lr_psnr, ms_ssim, psnr, ssim
from cxr_sr.imaging import SCALE
from cxr_sr.imaging import bicubic_baseline as bicubic_baseline  # the baseline, re-exported

GAP = 4  # pixels between panels
METRICS = {"psnr": psnr, "ssim": ssim, "ms_ssim": ms_ssim, "hfen": hfen}


def scores(
    sr: np.ndarray, bicubic: np.ndarray, lr: np.ndarray, hr: np.ndarray | None
) -> dict[str, float | None]:
    """The report's figures for one result: :data:`METRICS` of SR and of bicubic against
    ``hr`` (None without a reference) and the LR consistency of both (``lr_psnr``: their 4x
    area downsample against ``lr``), keyed ``psnr_sr``, ``psnr_bicubic``, ...,
    ``lr_psnr_bicubic``. ``lr`` is ``[h, w]``, the others ``[4h, 4w]``."""
    out: dict[str, float | None] = {}
    for key, fn in METRICS.items():
        for who, x in (("sr", sr), ("bicubic", bicubic)):
            out[f"{key}_{who}"] = None if hr is None else float(fn(x, hr))
    for who, x in (("sr", sr), ("bicubic", bicubic)):
        out[f"lr_psnr_{who}"] = float(lr_psnr(x, lr, SCALE))
    return out


def _panel(x: np.ndarray | None, name: str, shape: tuple[int, int] | None) -> np.ndarray | None:
    if x is None:
        return None
    x = np.asarray(x, dtype=np.float64)
    while x.ndim > 2 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2 or (shape is not None and x.shape != shape):
        want = "[H, W]" if shape is None else f"[{shape[0]}, {shape[1]}] ({SCALE}x the LR)"
        raise ValueError(f"{name} must be {want}, got {np.shape(x)}")
    return np.clip(x, 0.0, 1.0)


def side_by_side(
    lr: np.ndarray,
    bicubic: np.ndarray | None,
    sr: np.ndarray,
    hr: np.ndarray | None = None,
    bits: int = 8,
) -> np.ndarray:
    """One strip: LR (nearest-upsampled) | bicubic | SR | HR, 4 px white gaps.

    ``lr`` is ``[h, w]`` and the others ``[4h, 4w]``, in [0, 1]; leading singleton axes are
    accepted. ``bicubic=None`` computes ``bicubic_baseline(lr)``; the HR panel is left out
    when ``hr`` is None. Returns ``uint8`` (``bits=8``) or ``uint16`` (``bits=16``) of shape
    ``[4h, 3 * 4w + 2 * 4]`` or ``[4h, 4 * 4w + 3 * 4]``.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    lr2 = _panel(lr, "lr", None)
    shape = (SCALE * lr2.shape[0], SCALE * lr2.shape[1])
    if bicubic is None:
        bicubic = bicubic_baseline(lr2)
    panels = [
        np.repeat(np.repeat(lr2, SCALE, axis=0), SCALE, axis=1),
        _panel(bicubic, "bicubic", shape),
        _panel(sr, "sr", shape),
    ]
    if hr is not None:
        panels.append(_panel(hr, "hr", shape))
    gap = np.ones((shape[0], GAP))
    strip = [panels[0]]
    for p in panels[1:]:
        strip += [gap, p]
    full = 65535 if bits == 16 else 255
    out = np.rint(np.concatenate(strip, axis=1) * full)
    return out.astype(np.uint16 if bits == 16 else np.uint8)


def save_side_by_side(
    path: str | os.PathLike,
    lr: np.ndarray,
    bicubic: np.ndarray | None,
    sr: np.ndarray,
    hr: np.ndarray | None = None,
    bits: int = 8,
) -> Path:
    """Write ``side_by_side(...)`` as a gray PNG; returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(side_by_side(lr, bicubic, sr, hr, bits=bits)).save(path, format="PNG")
    return path


Column = str | tuple[str, str] | tuple[str, str, str]


def _cell(value: Any, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt and isinstance(value, (int, float, np.integer, np.floating)):
        return format(value, fmt)
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A plain aligned text table.

    ``columns`` items are ``key``, ``(key, header)`` or ``(key, header, format_spec)``
    (e.g. ``("psnr_sr", "PSNR SR", ".2f")``). Missing / None / NaN values print as "-";
    numbers are right-aligned, text left-aligned. A header and a rule line come first.
    """
    specs: list[tuple[str, str, str | None]] = []
    for c in columns:
        if isinstance(c, str):
            specs.append((c, c, None))
        elif len(c) == 2:
            specs.append((c[0], c[1], None))
        elif len(c) == 3:
            specs.append((c[0], c[1], c[2]))
        else:
            raise ValueError(f"bad column spec {c!r}")
    cells = [[_cell(r.get(k), f) for k, _, f in specs] for r in rows]
    numeric = [
        all(
            isinstance(r.get(k), (int, float, np.integer, np.floating)) or r.get(k) is None
            for r in rows
        )
        for k, _, _ in specs
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (_, h, _) in enumerate(specs)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [line([h for _, h, _ in specs]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)
