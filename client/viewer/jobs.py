"""The viewer's work, away from HTTP: one uploaded image in, LR / bicubic / SR (/ HR) out.

A :class:`Job` is one uploaded file and one mode:

- ``upscale``: the file is the LR; SR = ``SRClient.upscale`` (tiled when larger than the
  server takes), bicubic = ``cxr_sr.imaging.bicubic_baseline``; no reference, so only the
  LR consistency of both is reported;
- ``native``: the file is the HR (``cxr_sr.imaging.native_pair``: cropped to a multiple of
  4, LR = its 4x area downsample); PSNR / SSIM of SR and bicubic against it, and their LR
  consistency (``cxr_sr.client.metrics``).

Jobs run one at a time on a worker thread (the cpu target computes one batch at a time, and
a second image would only double the memory), report tile progress, and keep their images
as ``uint16`` pixels for the page to window itself. :class:`JobStore` keeps the last few.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from cxr_sr.client.io import is_dicom, read_image
from cxr_sr.client.metrics import lr_psnr, psnr, ssim
from cxr_sr.client.triton import ModelIdentity, SRClient, SRConnectionError, SRServerError
from cxr_sr.imaging import SCALE, bicubic_baseline, native_pair

log = logging.getLogger(__name__)

UPSCALE, NATIVE = "upscale", "native"
MODES = {
    UPSCALE: f"upscale this image: it is the LR, SR is {SCALE}x its size; no reference, so "
    "no PSNR/SSIM",
    NATIVE: f"score on this image (native protocol): it is the HR, LR = its {SCALE}x area "
    "downsample; PSNR/SSIM of SR and bicubic against it at full size",
}
# the images a job shows; LR at its own size, the others at SCALE x the LR
KINDS = ("lr", "bicubic", "sr", "hr")
KEEP_JOBS = 4  # finished jobs kept in memory (the whole radiograph at native scale: ~60 MB)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"


def to_uint16(image: np.ndarray) -> np.ndarray:
    """``[H, W]`` in [0, 1] -> ``uint16`` ``[H, W]`` (0..65535, rounded), what the page
    windows: 16 bits keep the full depth of a DICOM or 16-bit PNG for window/level."""
    return np.rint(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 65535).astype("<u2")


def image_metrics(
    sr: np.ndarray, bicubic: np.ndarray, lr: np.ndarray, hr: np.ndarray | None
) -> dict[str, float | None]:
    """PSNR / SSIM of SR and bicubic against ``hr`` (None without one) and the LR
    consistency of both (``lr_psnr``). ``lr`` is ``[h, w]``, the others ``[4h, 4w]``."""
    out: dict[str, float | None] = {}
    for who, x in (("sr", sr), ("bicubic", bicubic)):
        out[f"psnr_{who}"] = None if hr is None else float(psnr(x, hr))
        out[f"ssim_{who}"] = None if hr is None else float(ssim(x, hr))
        out[f"lr_psnr_{who}"] = float(lr_psnr(x, lr, SCALE))
    return out


@dataclass
class Job:
    """One uploaded image and its results. ``folder`` holds the upload (kept for the
    derived DICOM, which copies the source's patient and study) and the downloads."""

    name: str
    mode: str
    path: Path
    sampling: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: str = QUEUED
    stage: str = "waiting for the server"
    message: str = ""
    done: int = 0
    total: int = 0
    input_size: tuple[int, int] | None = None
    seconds: float | None = None
    metrics: dict[str, float | None] | None = None
    pixels: dict[str, np.ndarray] = field(default_factory=dict)  # kind -> uint16 [H, W]
    sr: np.ndarray | None = None  # float32 [4h, 4w], for the downloads
    model: ModelIdentity | None = None  # the served model that made the SR
    # a job from the PACS: fetch(path) writes the image there and returns its display name;
    # ValueError with a message for the page when it cannot
    fetch: Callable[[Path], str] | None = field(default=None, repr=False)
    created: float = field(default_factory=time.time)

    @property
    def folder(self) -> Path:
        return self.path.parent

    def dicom_problem(self) -> str | None:
        """None when the SR can be downloaded as a derived DICOM of the upload, else why not.

        A derived instance is the source's image at 4x its own rows and columns, so it needs
        a DICOM upload in the upscale mode (in the native protocol the SR is an estimate of
        the upload itself, made from its downsample, not a derivative of it)."""
        if self.mode != UPSCALE:
            return "a derived DICOM is the 4x of the upload: use 'upscale this image'"
        if not is_dicom(self.path):
            return "a derived DICOM needs a DICOM upload (it joins the source's study)"
        return None

    def summary(self) -> dict[str, Any]:
        """The job as the page polls it (JSON)."""
        return {
            "id": self.id,
            "name": self.name,
            "mode": self.mode,
            "mode_text": MODES[self.mode],
            "state": self.state,
            "stage": self.stage,
            "message": self.message,
            "progress": {"done": self.done, "total": self.total},
            "input_size": self.input_size,
            "sizes": {k: list(v.shape) for k, v in self.pixels.items()},
            "metrics": _json_metrics(self.metrics),
            "seconds": self.seconds,
            "sampling": self.sampling,
            "model": None if self.model is None else self.model.short(),
            "dicom": self.dicom_problem(),
        }


class JobStopped(Exception):  # noqa: N818 (a signal, not an error)
    """The viewer is stopping: the job ends after the tile in flight."""


def header_size(path: Path) -> tuple[int, int] | None:
    """An image file's ``(H, W)`` from its header, without decoding the pixels; None when the
    header does not say (``read_image`` will then report what is wrong with the file).

    Raises ``ValueError`` for an image Pillow refuses to open as a decompression bomb."""
    try:
        if is_dicom(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            return int(ds.Rows), int(ds.Columns)
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}") from None
    except Exception:  # anything unreadable: read_image says why, with the file's name
        return None


def _check_output(job: Job, h: int, w: int, max_output_pixels: int) -> None:
    """ValueError unless an ``h`` x ``w`` input gives an SR within the limit in the job's
    mode (upscale: the input is the LR; native: the input is the HR, cropped to 4)."""
    lr_h, lr_w = (h, w) if job.mode == UPSCALE else (h // SCALE, w // SCALE)
    out_pixels = SCALE * SCALE * lr_h * lr_w
    if out_pixels > max_output_pixels:
        raise ValueError(
            f"{job.name}: a {lr_h}x{lr_w} LR gives a {SCALE * lr_h}x{SCALE * lr_w} SR "
            f"({out_pixels / 1e6:.1f} MP), over this viewer's limit of "
            f"{max_output_pixels / 1e6:.1f} MP (--max-output-mp)"
            + ("; 'score on this image' works at its own size" if job.mode == UPSCALE else "")
        )


def _json_metrics(metrics: dict[str, float | None] | None) -> dict[str, Any] | None:
    """Metrics as strict JSON: an infinite PSNR (identical images, e.g. a flat upload's
    bicubic) becomes the string "inf"."""
    if metrics is None:
        return None
    return {k: "inf" if v is not None and math.isinf(v) else v for k, v in metrics.items()}


def _readable(error: Exception, job: Job) -> str:
    """The error's message with the upload's temporary path replaced by the file's name."""
    return str(error).replace(str(job.path), job.name)


def run_job(
    job: Job,
    client: SRClient,
    max_output_pixels: int,
    should_stop: Callable[[], bool] = lambda: False,
    tile: int | None = None,
) -> None:
    """Read, super-resolve and score one job, recording every stage on ``job``.

    Never raises for the user's file or the server: a bad file, an image over
    ``max_output_pixels`` (SR pixels), an unreachable or refusing server end the job as
    ``failed`` with a message meant for the page. ``should_stop()`` is asked after each
    tile; True ends the job there. ``tile``: the LR tile side (default: the server's
    largest).
    """
    t0 = time.perf_counter()
    job.state = RUNNING
    try:
        job.stage = "reading the file"
        size = header_size(job.path)
        if size is not None:  # refuse before decoding what would not fit
            _check_output(job, *size, max_output_pixels)
        image = read_image(job.path)
        job.input_size = (int(image.shape[0]), int(image.shape[1]))
        _check_output(job, *job.input_size, max_output_pixels)
        if job.mode == NATIVE:
            hr, lr = native_pair(image)
        else:
            hr, lr = None, image
        h, w = lr.shape
        job.stage = "bicubic"
        bicubic = bicubic_baseline(lr)
        job.total = len(client.tile_plan(h, w, tile=tile))
        job.stage = "super-resolving" + (f" ({job.total} tiles)" if job.total > 1 else "")

        def progress(done: int, total: int) -> None:
            job.done, job.total = done, total
            if should_stop():
                raise JobStopped

        sr = client.upscale(lr, tile=tile, progress=progress, **job.sampling)
        job.model = client.model_identity()
        job.stage = "scoring" if hr is not None else "LR consistency"
        job.metrics = image_metrics(sr, bicubic, lr, hr)
        images = {"lr": lr, "bicubic": bicubic, "sr": sr, "hr": hr}
        job.pixels = {k: to_uint16(x) for k, x in images.items() if x is not None}
        job.sr = sr
        job.state, job.stage = DONE, "done"
    except JobStopped:
        job.state, job.stage, job.message = FAILED, "failed", "The viewer was stopped."
    except SRConnectionError as e:
        job.state, job.stage = FAILED, "failed"
        job.message = (
            f"The Triton server is not answering ({e}). Start it (make serve) or point the "
            "viewer at a running one (--url)."
        )
    except SRServerError as e:
        job.state, job.stage = FAILED, "failed"
        job.message = f"The Triton server refused the request: {e}"
    except ValueError as e:
        job.state, job.stage = FAILED, "failed"
        job.message = _readable(e, job)
    except Exception:  # never a traceback in the page: log it, say where to look
        log.exception("job %s (%s) failed", job.id, job.name)
        job.state, job.stage = FAILED, "failed"
        job.message = "Unexpected error in the viewer; the details are in its log."
    finally:
        job.seconds = time.perf_counter() - t0


class JobStore:
    """The viewer's jobs: one worker thread runs them in order; beyond :data:`KEEP_JOBS`,
    the oldest finished ones are deleted with their upload folders.

    ``client_factory()`` makes the ``SRClient`` a job uses, in the worker thread
    (tritonclient's HTTP client is not shared across threads); ``tile``: the LR tile side
    (None: the server's largest).
    """

    def __init__(
        self,
        root: Path,
        client_factory: Callable[[], SRClient],
        max_output_pixels: int,
        keep: int = KEEP_JOBS,
        tile: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.client_factory = client_factory
        self.max_output_pixels = int(max_output_pixels)
        self.keep = keep
        self.tile = tile
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cxr-sr-viewer")
        self._stopping = threading.Event()

    def new_folder(self) -> Path:
        """A fresh folder for one upload."""
        folder = self.root / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        return folder

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._jobs[job.id] = job
            finished = [j for j in self._jobs.values() if j.state in (DONE, FAILED)]
            for old in finished[: max(0, len(self._jobs) - self.keep)]:  # oldest first
                del self._jobs[old.id]
                shutil.rmtree(old.folder, ignore_errors=True)
        self._worker.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        try:
            if job.fetch is not None:
                job.state, job.stage = RUNNING, "retrieving the study from the PACS"
                job.name = job.fetch(job.path)
            client = self.client_factory()
        except ValueError as e:  # the PACS had no image for us, or a bad --url / --protocol
            job.state, job.stage, job.message = FAILED, "failed", str(e)
            return
        except Exception:  # a job must end, or the page would wait for it forever
            log.exception("job %s (%s) failed", job.id, job.name)
            job.state, job.stage = FAILED, "failed"
            job.message = "Unexpected error in the viewer; the details are in its log."
            return
        with client:
            run_job(job, client, self.max_output_pixels, self._stopping.is_set, self.tile)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def close(self) -> None:
        """Stop taking jobs, end the running one after its tile in flight, delete the
        uploads."""
        self._stopping.set()
        self._worker.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)
