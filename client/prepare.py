"""Turning a radiograph into the model's input: the reference protocol.

The evaluation protocol (the one the NIH ChestX-ray14 numbers use) is:

1. centre-crop the whole radiograph to a square (the shorter side);
2. resize that square to ``HR_SIZE`` x ``HR_SIZE`` (256) with Pillow's LANCZOS filter on
   a float32 (mode "F") image. Pillow widens the kernel by the reduction factor, so this
   is an antialiased reduction; the result is clipped to [0, 1] (Lanczos overshoots);
3. LR = ``cxr_sr.imaging.area_downsample(HR, 4)``: 4x4 block means, 64 x 64, the same
   degradation as training.

The HR image is the reference that PSNR/SSIM are measured against.
"""

from __future__ import annotations

import numpy as np

from cxr_sr.imaging import HR_SIZE, LR_SIZE, SCALE, area_downsample


def _check_image(image: np.ndarray) -> np.ndarray:
    x = np.asarray(image)
    if x.ndim != 2:
        raise ValueError(f"expected a [H, W] image, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise ValueError("image must be real-valued and finite")
    return x.astype(np.float32)


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """Central ``[S, S]`` crop of ``[H, W]``, ``S = min(H, W)`` (odd remainders go right/down)."""
    x = _check_image(image)
    h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[top : top + s, left : left + s]


def to_reference_hr(image: np.ndarray, size: int = HR_SIZE) -> np.ndarray:
    """Reference HR image: centre square crop, LANCZOS resize to ``[size, size]``, clip [0, 1].

    ``image``: ``[H, W]`` float in [0, 1] with ``min(H, W) >= size`` (an HR reference cannot
    be made by enlarging a smaller image; give such an image to ``prepare`` as LR instead).
    Returns float32 ``[size, size]``.
    """
    from PIL import Image

    x = center_crop_square(image)
    if x.shape[0] < size:
        raise ValueError(
            f"image is {image.shape[0]}x{image.shape[1]}: a {size}x{size} reference needs at "
            f"least {size} pixels on the shorter side (use a {LR_SIZE}x{LR_SIZE} LR input "
            "instead)"
        )
    if x.shape[0] == size:
        return np.clip(x, 0.0, 1.0)
    im = Image.fromarray(np.ascontiguousarray(x, dtype=np.float32))  # mode "F"
    out = np.asarray(im.resize((size, size), resample=Image.Resampling.LANCZOS))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def make_lr(hr: np.ndarray) -> np.ndarray:
    """LR input from an HR image: 4x area downsample, ``[..., 256, 256] -> [..., 64, 64]``."""
    return area_downsample(np.asarray(hr, dtype=np.float32), SCALE)


def prepare(image: np.ndarray, lr_as_is: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Model input and reference for one radiograph.

    ``image``: ``[H, W]`` float in [0, 1]. A 64 x 64 image (or any image with
    ``lr_as_is=True``, which then must be 64 x 64) is the LR itself and has no reference.
    Anything else follows the reference protocol (module docstring).

    Returns ``(lr [64, 64], hr [256, 256] or None)``, float32.
    """
    x = _check_image(image)
    if x.shape == (LR_SIZE, LR_SIZE):
        return np.clip(x, 0.0, 1.0), None
    if lr_as_is:
        raise ValueError(
            f"--lr-as-is needs {LR_SIZE}x{LR_SIZE} images, got {x.shape[0]}x{x.shape[1]}"
        )
    hr = to_reference_hr(x)
    return make_lr(hr), hr
