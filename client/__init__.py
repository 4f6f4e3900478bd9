"""Light client for the chest X-ray super-resolution service (numpy, Pillow, pydicom,
tritonclient; no torch).

- ``client.io``: ``read_image`` (PNG/JPEG/TIFF/DICOM -> float32 [H, W] in [0, 1]),
  ``dataset_image`` (the same for a pydicom dataset), ``image_bits``, ``write_png``,
  ``iter_inputs``;
- ``client.dicom``: ``derive_instance`` (the derived Secondary Capture of a DICOM source, in
  its study, with deterministic UIDs), ``upscale_dataset``, ``domain_problem``;
- ``client.prepare``: the reference protocol, ``prepare(image) -> (lr [64, 64], hr)``;
- ``client.metrics``: ``psnr``, ``ssim``, ``ms_ssim``, ``hfen``, ``lr_psnr``;
- ``client.triton``: ``SRClient`` for the ``cxr_sr`` ensemble: ``super_resolve`` (a batch
  within the server's size limits), ``upscale`` (one image of any size, tiled) and
  ``model_identity`` (``ModelIdentity``: name, version, weights hash);
- ``client.tiling``: tile plans and feathered blending (numpy);
- ``client.batch``: ``run_batch(inputs, out, urls=...) -> Report``, the resumable batch
  engine (manifest, retries, several servers, report files) behind ``cxr-sr upscale``;
  ``client.manifest``: its SQLite job manifest; ``client.servers``: its server pool
  (least busy server, retries with backoff on transient errors);
- ``client.report``: scores, side-by-side strips and text tables; ``client.cli``: ``cxr-sr``;
- ``client.exit_codes``: the exit-code table of every command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Each name is imported from its module on first use (PEP 562), so `from cxr_sr.client import
# SRClient` does not load highdicom, pynetdicom and dicomweb-client, which only the study
# commands need (a scripted client starts in about half the time).
_EXPORTS = {
    "Report": "batch",
    "run_batch": "batch",
    "derive_instance": "dicom",
    "domain_problem": "dicom",
    "upscale_dataset": "dicom",
    "dataset_image": "io",
    "image_bits": "io",
    "iter_inputs": "io",
    "read_image": "io",
    "write_png": "io",
    "hfen": "metrics",
    "lr_psnr": "metrics",
    "ms_ssim": "metrics",
    "psnr": "metrics",
    "ssim": "metrics",
    "make_lr": "prepare",
    "prepare": "prepare",
    "to_reference_hr": "prepare",
    "bicubic_baseline": "report",
    "format_table": "report",
    "save_side_by_side": "report",
    "scores": "report",
    "side_by_side": "report",
    "submit_study": "studies",
    "ModelIdentity": "triton",
    "SizeLimits": "triton",
    "SRClient": "triton",
    "SRConnectionError": "triton",
    "SRServerError": "triton",
}

if TYPE_CHECKING:
    from cxr_sr.client.batch import Report, run_batch
    from cxr_sr.client.dicom import derive_instance, domain_problem, upscale_dataset
    from cxr_sr.client.io import dataset_image, image_bits, iter_inputs, read_image, write_png
    from cxr_sr.client.metrics import hfen, lr_psnr, ms_ssim, psnr, ssim
    from cxr_sr.client.prepare import make_lr, prepare, to_reference_hr
    from cxr_sr.client.report import (
        bicubic_baseline,
        format_table,
        save_side_by_side,
        scores,
        side_by_side,
    )
    from cxr_sr.client.studies import submit_study
    from cxr_sr.client.triton import (
        ModelIdentity,
        SizeLimits,
        SRClient,
        SRConnectionError,
        SRServerError,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "ModelIdentity",
    "Report",
    "SRClient",
    "SRConnectionError",
    "SRServerError",
    "SizeLimits",
    "bicubic_baseline",
    "dataset_image",
    "derive_instance",
    "domain_problem",
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
    "run_batch",
    "save_side_by_side",
    "scores",
    "side_by_side",
    "ssim",
    "submit_study",
    "to_reference_hr",
    "upscale_dataset",
    "write_png",
]
