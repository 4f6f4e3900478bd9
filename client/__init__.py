"""Light client for the chest X-ray super-resolution service (numpy, Pillow, pydicom,
tritonclient; no torch).

- ``client.io``: ``read_image`` (PNG/JPEG/TIFF/DICOM -> float32 [H, W] in [0, 1]),
  ``image_bits``, ``write_png``, ``write_dicom_sc``, ``iter_inputs``;
- ``client.prepare``: the reference protocol, ``prepare(image) -> (lr [64, 64], hr)``;
- ``client.metrics``: ``psnr``, ``ssim``, ``ms_ssim``, ``hfen``, ``lr_psnr``;
- ``client.triton``: ``SRClient`` for the ``cxr_sr`` ensemble: ``super_resolve`` (a batch
  within the server's size limits) and ``upscale`` (one image of any size, tiled);
- ``client.tiling``: tile plans and feathered blending (numpy);
- ``client.report``: scores, side-by-side strips and text tables; ``client.cli``: ``cxr-sr``.
"""

from cxr_sr.client.io import image_bits, iter_inputs, read_image, write_dicom_sc, write_png
from cxr_sr.client.metrics import hfen, lr_psnr, ms_ssim, psnr, ssim
from cxr_sr.client.prepare import make_lr, prepare, to_reference_hr
from cxr_sr.client.report import (
    bicubic_baseline,
    format_table,
    save_side_by_side,
    scores,
    side_by_side,
)
from cxr_sr.client.triton import SizeLimits, SRClient, SRConnectionError, SRServerError

__all__ = [
    "SRClient",
    "SRConnectionError",
    "SRServerError",
    "SizeLimits",
    "bicubic_baseline",
    "format_table",
    "hfen",
    "image_bits",
    "iter_inputs",
    "lr_psnr",
    "make_lr",
    "ms_ssim",
    "prepare",
    "psnr",
    "read_image",
    "save_side_by_side",
    "scores",
    "side_by_side",
    "ssim",
    "to_reference_hr",
    "write_dicom_sc",
    "write_png",
]
