"""Turning a radiograph into the model's input: the reference protocol of ``cxr_sr.imaging``.

The protocol (defined once, in ``cxr_sr.imaging.reference_pair``; training, evaluation, the
demo and the benchmarks call the same function):

1. centre-crop the whole radiograph to a square (the shorter side);
2. resize that square to ``HR_SIZE`` x ``HR_SIZE`` (256) with ``cxr_sr.imaging.resize``
   (antialiased bilinear, ``F.interpolate(mode="bilinear", antialias=True)``), clipped to
   [0, 1];
3. LR = ``cxr_sr.imaging.area_downsample(HR, 4)``: 4x4 block means, 64 x 64, the same
   degradation as training.

The HR image is the reference that PSNR/SSIM are measured against.
"""

from __future__ import annotations

import numpy as np

from cxr_sr.imaging import (
    HR_SIZE,
    LR_SIZE,
    SCALE,
    area_downsample,
    check_image,
    reference_hr,
    reference_pair,
)


def to_reference_hr(image: np.ndarray, size: int = HR_SIZE) -> np.ndarray:
    """Reference HR image, float32 ``[size, size]``: ``cxr_sr.imaging.reference_hr``.

    ``image``: ``[H, W]`` float in [0, 1] with ``min(H, W) >= size`` (an HR reference cannot
    be made by enlarging a smaller image; give such an image to ``prepare`` as LR instead).
    """
    return reference_hr(image, size)


def make_lr(hr: np.ndarray) -> np.ndarray:
    """LR input from an HR image: 4x area downsample, ``[..., 256, 256] -> [..., 64, 64]``."""
    return area_downsample(np.asarray(hr, dtype=np.float32), SCALE)


def prepare(image: np.ndarray, lr_as_is: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Model input and reference for one radiograph.

    ``image``: ``[H, W]`` float in [0, 1]. A 64 x 64 image (or any image with
    ``lr_as_is=True``, which then must be 64 x 64) is the LR itself and has no reference.
    Anything else follows the reference protocol (``cxr_sr.imaging.reference_pair``).

    Returns ``(lr [64, 64], hr [256, 256] or None)``, float32.
    """
    x = check_image(image)
    if x.shape == (LR_SIZE, LR_SIZE):
        return np.clip(x, 0.0, 1.0), None
    if lr_as_is:
        raise ValueError(
            f"lr_as_is needs a {LR_SIZE}x{LR_SIZE} image, got {x.shape[0]}x{x.shape[1]}"
        )
    try:
        hr, lr = reference_pair(x, HR_SIZE, SCALE)
    except ValueError as err:
        raise ValueError(f"{err} (or use a {LR_SIZE}x{LR_SIZE} LR input)") from None
    return lr, hr
