"""Batch runs that survive interruption: ``run_batch(inputs, out, urls=...) -> Report``.

The engine behind ``cxr-sr upscale`` (and the PACS commands' study runs): it reads the
inputs, runs ``concurrency`` of them at a time through a :class:`Worker` (read, super-resolve,
write, score) and writes the report files. Every input gets a row in the job manifest
(``client.manifest``), ``<out>/cxr-sr-manifest.sqlite`` (SQLite, WAL): its key (the output
stem relative to ``out``), path, state (pending, running, done, failed, skipped), outputs,
error, attempts, timings, report row and the identity of the model that made it; requests go
through the server pool (``client.servers``). Hence:

- a run that was killed resumes: a re-run of the same command skips the done rows and does
  the rest; rows left running by the killed run start again; failed and skipped rows are
  tried again;
- nothing is lost or duplicated: every output is written to a temporary file beside it and
  moved into place (``os.replace``) before its row is marked done; outputs have fixed names
  and derived DICOM instances fixed UIDs (``client.dicom``), so an input done again (killed
  between the move and the mark) replaces its own outputs; temporaries a killed run left
  behind are removed at the start;
- a changed model identity or settings (mode, sampling, outputs) is noticed: the run refuses
  (``on_change="refuse"``, a usage error naming both) or redoes the done rows (``"redo"``);
- bounded concurrency: ``concurrency`` images in flight, each on the least busy of ``urls``
  (ties in turn), each request retried on transient errors (connection refused or reset,
  HTTP 502/503/504, gRPC UNAVAILABLE) with exponential backoff and jitter, a failing server
  set aside for the backoff; a refused request (400) is the input's failure, never retried;
- when no server answers after the retries the run stops (exit code 3), its manifest
  intact; a server that comes back from a restart serving another model stops it too (exit
  code 2: its results would not be of one model); when the output disk is full (ENOSPC,
  EDQUOT, EFBIG) the run stops with one line saying so (exit code 1), and a re-run once
  space is back finishes the job;
- one run per output folder at a time (a lock file); a second is refused (exit code 2);
- bad inputs (corrupt, truncated, empty, unreadable, not an image, no pixel data, a header
  claiming more than ``max_pixels`` pixels: refused before decoding, a DICOM outside the
  model's domain) get one line in the report each and the batch goes on.

The per-image report goes to ``<out>/report.csv`` and ``<out>/report.json`` (input, outputs,
sizes, PSNR/SSIM where a reference exists, latency, attempts, status, error, model name,
version and weights hash); ``Report.summary()`` is the closing line.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from tqdm import tqdm

from cxr_sr.client.dicom import derive_instance, domain_problem
from cxr_sr.client.exit_codes import EXIT_INPUT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from cxr_sr.client.io import (
    dataset_image,
    image_bits,
    image_size,
    is_dicom,
    read_image,
    scan_inputs,
    write_png,
)
from cxr_sr.client.manifest import (
    DONE,
    FAILED,
    MANIFEST,
    PENDING,
    SKIPPED,
    Manifest,
    ManifestMismatchError,
)
from cxr_sr.client.report import METRICS, bicubic_baseline, save_side_by_side, scores
from cxr_sr.client.servers import (
    DEFAULT_BACKOFF_S,
    DEFAULT_RETRIES,
    MixedModelsError,
    ModelChangedError,
    ServerPool,
    UnreachableError,
)
from cxr_sr.client.triton import DEFAULT_IN_FLIGHT, ModelIdentity, SRClient, SRServerError
from cxr_sr.imaging import native_pair, reference_pair

LOCK = ".cxr-sr.lock"  # held (flock) by the run using the folder; the OS drops it on exit
REPORT_CSV, REPORT_JSON = "report.csv", "report.json"
UPSCALE = "upscale"
MODES = (UPSCALE, "reference", "native")
ON_CHANGE = ("refuse", "redo")
# Largest input (LR) accepted by default, in pixels: 3000 x 3000 (the output is 16x that:
# 144 MP, 0.6 GB as float32 before blending). Checked from the header, before decoding.
DEFAULT_MAX_PIXELS = 3000 * 3000
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_PARTIAL = ".partial-"  # temporary output files: .<name>.partial-<pid>-<thread>
_PAIRS = {"reference": reference_pair, "native": native_pair}
REPORT_COLUMNS = (
    "key",
    "input",
    "status",
    "outputs",
    "size",
    "out_size",
    "psnr_sr",
    "ssim_sr",
    "psnr_bicubic",
    "ssim_bicubic",
    "lr_psnr_sr",
    "lr_psnr_bicubic",
    "seconds",
    "attempts",
    "retries",
    "server",
    "error",
    "model_name",
    "model_version",
    "weights_sha256",
)


class BadInputError(ValueError):
    """This input cannot be super-resolved (its own line in the report, the batch goes on)."""


class OutOfDomainError(ValueError):
    """A DICOM input outside the model's domain: skipped with the reason, unless forced."""


class DiskFullError(OSError):
    """Writing an output or the manifest failed for lack of space (ENOSPC, EDQUOT, EFBIG)."""


def is_disk_full(e: BaseException) -> bool:
    """True for the errors of a full disk, quota or file-size limit (SQLite's included)."""
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        return True
    return isinstance(e, sqlite3.OperationalError) and "full" in str(e).lower()


# --- one input -------------------------------------------------------------------------------


@dataclass
class Settings:
    """What a batch does to each input (``run_batch``'s arguments of the same names)."""

    mode: str = UPSCALE
    png: bool = True
    dicom: bool = False
    side_by_side: bool = False
    force: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S
    tile: int | None = None
    overlap: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a done row depends on (a change means its outputs are stale)."""
        keys = ("mode", "png", "dicom", "side_by_side", "tile", "overlap", "sampling")
        return {k: getattr(self, k) for k in keys}


def _atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` then move ``tmp`` onto ``path`` (one rename: readers see the old file
    or the whole new one, never a part). Disk-full errors become :class:`DiskFullError`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_PARTIAL}{os.getpid()}-{threading.get_ident()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(e):
            raise DiskFullError(e.errno, f"{e.strerror or e} writing {path}") from e
        raise
    return path


def remove_partials(out: Path) -> int:
    """Remove temporary output files an interrupted run left under ``out``; returns how many."""
    n = 0
    for f in out.rglob(f".*{_PARTIAL}*"):
        with contextlib.suppress(OSError):
            f.unlink()
            n += 1
    return n


def _size(x: np.ndarray) -> str:
    return f"{x.shape[0]}x{x.shape[1]}"


def _read(path: Path, settings: Settings) -> tuple[np.ndarray, pydicom.Dataset | None]:
    """Check the header (size limit), then read the image (and the dataset of a DICOM)."""
    h, w = image_size(path)  # ValueError: empty, unreadable, not an image, no Rows/Columns
    if h * w > settings.max_pixels:
        raise BadInputError(
            f"{path}: image is {h}x{w} = {h * w / 1e6:.1f} MP, above the limit of "
            f"{settings.max_pixels / 1e6:.1f} MP (--max-pixels); refused before decoding"
        )
    if not is_dicom(path):
        return read_image(path), None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as e:  # pydicom raises many types for a truncated file
        raise BadInputError(f"{path}: not a readable DICOM file ({e})") from e
    problem = domain_problem(ds)
    if problem and not settings.force:
        raise OutOfDomainError(f"{problem} (--force to process it anyway)")
    try:
        image = dataset_image(ds, str(path))
    except (ValueError, BadInputError):
        raise
    except Exception as e:  # truncated pixel data and friends raise many types
        raise BadInputError(f"{path}: cannot decode DICOM pixel data ({e})") from e
    if image.ndim != 2 or not np.isfinite(image).all():
        raise BadInputError(f"{path}: not a finite 2-D image")
    return np.clip(image, 0.0, 1.0).astype(np.float32), ds


class Worker:
    """Does one input: read, super-resolve (with retries over the pool), write, score."""

    def __init__(
        self, pool: ServerPool, settings: Settings, out: Path, model: ModelIdentity
    ) -> None:
        self.pool, self.settings, self.out, self.model = pool, settings, out, model
        self.tile_bar = False  # a progress bar over the tiles of each image (one at a time)
        self.bar_disable: bool | None = None  # tqdm's disable: None shows it on a terminal

    def __call__(self, key: str, path: Path) -> tuple[list[str], dict[str, Any]]:
        s = self.settings
        image, ds = _read(path, s)
        row: dict[str, Any] = {"size": _size(image)}
        if s.mode == UPSCALE:
            lr, hr = image, None
        else:
            try:
                pair = _PAIRS[s.mode](image)
            except ValueError as e:
                raise BadInputError(f"{path}: {e}") from e
            lr, hr = pair.lr, pair.hr
            row["scale"] = f"{_size(pair.hr)} / {_size(pair.lr)}"
        bar = _TileBar(self.bar_disable) if self.tile_bar else None
        t0 = time.perf_counter()
        try:
            sr, url, retries = self.pool.upscale(
                lr,
                self.model,
                retries=s.retries,
                backoff=s.backoff_s,
                overlap=s.overlap,
                tile=s.tile,
                sampling=s.sampling,
                progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        outputs = self._write(key, path, sr, lr, hr, ds)
        bic = bicubic_baseline(lr)
        row.update(
            out_size=_size(sr),
            bits=image_bits(path),
            tiles=len(self.pool.client(url).tile_plan(*lr.shape, s.overlap, s.tile)),
            server=url,
            retries=retries,
            **scores(sr, bic, lr, hr),
            seconds=seconds,
        )
        return outputs, row

    def _write(
        self,
        key: str,
        path: Path,
        sr: np.ndarray,
        lr: np.ndarray,
        hr: np.ndarray | None,
        ds: pydicom.Dataset | None,
    ) -> list[str]:
        s, stem = self.settings, self.out / key
        outputs = []
        if s.png:
            target = stem.with_name(f"{stem.name}_sr.png")
            bits = image_bits(path)
            _atomic(target, lambda t: write_png(t, sr, bits=bits))
            outputs.append(target)
        if s.dicom and ds is not None:
            derived = derive_instance(ds, sr, self.model, sampling=s.sampling)
            target = stem.with_name(f"{stem.name}_sr.dcm")
            _atomic(target, lambda t: derived.save_as(t, enforce_file_format=True))
            outputs.append(target)
        if s.side_by_side:
            target = stem.with_name(f"{stem.name}_compare.png")
            _atomic(target, lambda t: save_side_by_side(t, lr, None, sr, hr))
            outputs.append(target)
        return [str(o) for o in outputs]


class _TileBar:
    """A progress bar over the tiles of one image, shown only when it has several."""

    def __init__(self, disable: bool | None) -> None:
        self.disable = disable
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if total <= 1:
            return
        if self.bar is None:
            self.bar = tqdm(
                total=total, desc="tiles", unit="tile", leave=False, disable=self.disable
            )
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Report:
    """What a batch did: one row per input (``REPORT_COLUMNS`` and the mode's metrics),
    the counts, the exit code (``client.exit_codes``) and where the report files are."""

    rows: list[dict[str, Any]]
    model: ModelIdentity | None
    exit_code: int
    message: str = ""
    seconds: float = 0.0
    resumed: int = 0
    files: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)

    @property
    def done(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == DONE]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == FAILED]

    def summary(self) -> str:
        """One line: the counts, the time, the report files, and why the run stopped."""
        parts = [f"{self.count(DONE)} done"]
        if self.resumed:
            parts[0] += f" ({self.resumed} by an earlier run)"
        parts += [f"{self.count(FAILED)} failed", f"{self.count(SKIPPED)} skipped"]
        left = self.count(PENDING)
        if left:
            parts.append(f"{left} not done")
        line = f"{', '.join(parts)} in {self.seconds:.1f} s"
        if self.model is not None:
            line += f"; model {self.model.short()}"
        if self.files:
            line += f"; report {self.files[0]}"
        return line + (f"; {self.message}" if self.message else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model) if self.model else None,
            "summary": {s: self.count(s) for s in (DONE, FAILED, SKIPPED, PENDING)},
            "exit_code": self.exit_code,
            "message": self.message,
            "rows": self.rows,
        }


def collect(
    inputs: Sequence[str | os.PathLike],
) -> tuple[list[tuple[str, Path]], list[tuple[str, str]]]:
    """``(key, file)`` for every input file (key: the output stem relative to ``out``: a
    folder's sub-folder layout is kept, name clashes get ``_2``, ``_3``...) and
    ``(path, reason)`` for what cannot be an input (``client.io.scan_inputs``)."""
    jobs: list[tuple[str, Path]] = []
    problems: list[tuple[str, str]] = []
    used: set[str] = set()
    for arg in inputs:
        root = Path(arg)
        files, bad = scan_inputs([root])
        problems += [(str(p), reason) for p, reason in bad]
        for f in files:
            rel = f.relative_to(root).parent if root.is_dir() else Path()
            stem, k = (rel / f.stem).as_posix(), 2
            while stem in used:
                stem, k = (rel / f"{f.stem}_{k}").as_posix(), k + 1
            used.add(stem)
            jobs.append((stem, f))
    return jobs, problems


def _row(job: dict[str, Any]) -> dict[str, Any]:
    """A manifest row as a report row."""
    row = json.loads(job["row"]) if job.get("row") else {}
    return {
        "key": job["key"],
        "input": job["path"],
        "status": job["state"],
        "outputs": json.loads(job["outputs"] or "[]"),
        **row,
        "attempts": job["attempts"],
        "error": job["error"],
        "model_name": job["model_name"],
        "model_version": job["model_version"],
        "weights_sha256": job["weights_sha256"],
    }


def write_report(report: Report, out: Path, extra: dict[str, Any] | None = None) -> list[str]:
    """``<out>/report.csv`` and ``<out>/report.json`` (atomically); returns their paths."""
    metric_cols = [f"{k}_{w}" for k in METRICS for w in ("sr", "bicubic")]
    columns = list(dict.fromkeys([*REPORT_COLUMNS, *metric_cols]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in report.rows:
        writer.writerow({**r, "outputs": ";".join(r.get("outputs") or [])})
    csv_path, json_path = out / REPORT_CSV, out / REPORT_JSON
    _atomic(csv_path, lambda t: t.write_text(buf.getvalue()))
    body = {**(extra or {}), **report.to_json()}
    _atomic(json_path, lambda t: t.write_text(json.dumps(body, indent=2) + "\n"))
    return [str(csv_path), str(json_path)]


def run_batch(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    urls: Sequence[str] = ("127.0.0.1:8000",),
    *,
    protocol: str = "http",
    model: str = "cxr_sr",
    concurrency: int = 1,
    mode: str = UPSCALE,
    png: bool = True,
    dicom: bool = False,
    side_by_side: bool = False,
    force: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF_S,
    on_change: str = "refuse",
    timeout_s: float = 300.0,
    wait_s: float = 0.0,
    in_flight: int = DEFAULT_IN_FLIGHT,
    tile: int | None = None,
    overlap: int | None = None,
    sampling: dict[str, Any] | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    report_extra: dict[str, Any] | None = None,
) -> Report:
    """Super-resolve every image in ``inputs`` (files and folders) into ``out``, resumably.

    Args:
        inputs: image files (PNG, JPEG, TIFF, DICOM) and folders (searched recursively).
        out: output folder: ``<stem>_sr.png`` (and ``_sr.dcm``, ``_compare.png``), the
            manifest and the report files.
        urls: Triton ``host:port`` addresses; the batch is spread over them.
        concurrency: images in flight at once (each may send ``in_flight`` tile requests).
        mode: ``upscale`` (each input is the LR), or ``reference`` / ``native`` (score the
            model on a degraded copy, ``cxr_sr.imaging``).
        png, dicom, side_by_side: which outputs to write (``dicom``: the derived instance of
            each DICOM input, ``client.dicom``).
        force: process DICOM inputs outside the model's domain too.
        max_pixels: largest input in pixels, checked from the header before decoding.
        retries, backoff: attempts after the first on transient errors, and the base delay
            of their exponential backoff (seconds).
        on_change: ``refuse`` or ``redo`` when the manifest's model or settings differ.
        sampling: the request schema's sampling controls (``steps``, ``seed``, ...).
        progress: None: a progress bar on a terminal; True / False: always / never.
        log: where one-line messages go (default: stderr, through tqdm).

    Returns the :class:`Report` (also written to ``<out>/report.csv`` and ``.json``). Raises
    ``ValueError`` for bad arguments; server and input problems are in the report and its
    ``exit_code`` (0 all done, 1 some failed or not done, 2 manifest mismatch, 3 unreachable).
    """
    t_start = time.perf_counter()
    _check_arguments(mode, on_change, concurrency, retries, max_pixels, backoff, dicom, png)
    say = log or (lambda line: tqdm.write(line, file=sys.stderr))
    settings = Settings(
        mode=mode, png=png, dicom=dicom, side_by_side=side_by_side, force=force,
        max_pixels=max_pixels, retries=retries, backoff_s=backoff, tile=tile, overlap=overlap,
        sampling={k: v for k, v in (sampling or {}).items() if v is not None},
    )  # fmt: skip

    def make_client(url: str) -> SRClient:
        return SRClient(url, protocol, model, timeout_s=timeout_s, in_flight=in_flight)

    pool = ServerPool(urls, make_client)
    try:
        identity = _connect(pool, wait_s, say, t_start)
        out = Path(out)
        jobs, problems = collect(inputs)
        lock, manifest = _open_folder(out, identity, t_start)
    except _EarlyEndError as e:
        pool.close()
        return e.report
    try:
        resumed = _reconcile(manifest, jobs, identity, settings, on_change, say, t_start)
        for path, reason in problems:
            say(f"failed: {path}: {reason}")
        worker = Worker(pool, settings, out, identity)
        bar_disable = None if progress is None else not progress
        worker.tile_bar, worker.bar_disable = concurrency == 1, bar_disable
        stop = _run(manifest, worker, jobs, concurrency, say, bar_disable)
        report = _final_report(manifest, jobs, problems, identity, stop, out, resumed, t_start)
        extra = {
            "server": {"urls": pool.urls, "protocol": protocol, "model": model},
            "mode": {"name": mode},
            "sampling": settings.sampling,
            **(report_extra or {}),
        }
        try:
            report.files = write_report(report, out, extra)
        except (OSError, DiskFullError) as e:
            say(f"cxr-sr: could not write the report in {out}: {e}")
        return report
    except _EarlyEndError as e:
        return e.report
    finally:
        manifest.close()
        pool.close()
        lock.close()  # releases the flock


class _EarlyEndError(Exception):
    """A run that ends before its first job; ``report`` is what ``run_batch`` returns."""

    def __init__(self, report: Report) -> None:
        super().__init__(report.message)
        self.report = report


def _check_arguments(
    mode: str,
    on_change: str,
    concurrency: int,
    retries: int,
    max_pixels: int,
    backoff: float,
    dicom: bool,
    png: bool,
) -> None:
    """``ValueError`` for ``run_batch`` arguments out of range or that contradict each other."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if on_change not in ON_CHANGE:
        raise ValueError(f"on_change must be one of {ON_CHANGE}, got {on_change!r}")
    if concurrency < 1 or retries < 0 or max_pixels < 1 or not backoff >= 0:
        raise ValueError("concurrency and max_pixels must be >= 1, retries and backoff >= 0")
    if dicom and mode != UPSCALE:
        raise ValueError("derived DICOM is written in upscale mode only (it must be 4x its source)")
    if not (png or dicom):
        raise ValueError("nothing to write: enable PNG or DICOM outputs")


def _connect(
    pool: ServerPool, wait_s: float, say: Callable[[str], None], t_start: float
) -> ModelIdentity:
    """The identity of the model the servers serve (``ServerPool.model_identity``);
    :class:`_EarlyEndError` when none answers (exit 3) or they serve different models (exit 2)."""
    try:
        return pool.model_identity(wait_s, say)
    except UnreachableError as e:
        report = Report([], None, EXIT_UNREACHABLE, str(e), time.perf_counter() - t_start)
        raise _EarlyEndError(report) from e
    except MixedModelsError as e:
        report = Report([], None, EXIT_USAGE, str(e), time.perf_counter() - t_start)
        raise _EarlyEndError(report) from e


def _open_folder(
    out: Path, identity: ModelIdentity, t_start: float
) -> tuple[io.TextIOWrapper, Manifest]:
    """Create ``out``, take its lock (one run per folder), remove the temporaries a killed run
    left and open the manifest; returns the held lock file and the manifest.
    :class:`_EarlyEndError` when the folder cannot be used (exit 1) or another run holds it
    (exit 2)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / LOCK, "a")  # noqa: SIM115 (held until the run ends)
    except OSError as e:
        report = Report([], identity, EXIT_INPUT_FAILED, f"cannot use {out}: {e}")
        raise _EarlyEndError(report) from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        lock.close()
        busy = f"another cxr-sr run is using {out}; wait for it to end or give another --out"
        raise _EarlyEndError(
            Report([], identity, EXIT_USAGE, busy, time.perf_counter() - t_start)
        ) from e
    try:
        remove_partials(out)
        manifest = Manifest(out / MANIFEST)
    except (OSError, sqlite3.Error) as e:
        lock.close()
        message = f"cannot open the manifest in {out}: {e}"
        raise _EarlyEndError(Report([], identity, EXIT_INPUT_FAILED, message)) from e
    return lock, manifest


def _reconcile(
    manifest: Manifest,
    jobs: Sequence[tuple[str, Path]],
    identity: ModelIdentity,
    settings: Settings,
    on_change: str,
    say: Callable[[str], None],
    t_start: float,
) -> int:
    """Bring the manifest to this run: check its model and settings (``Manifest.check_run``:
    :class:`_EarlyEndError`, exit 2, on a refused change) and add the inputs (``Manifest.sync``).
    Returns how many inputs an earlier run did."""
    try:
        note = manifest.check_run(identity, settings.fingerprint(), on_change)
    except ManifestMismatchError as e:
        report = Report([], identity, EXIT_USAGE, str(e), time.perf_counter() - t_start)
        raise _EarlyEndError(report) from e
    if note:
        say(f"cxr-sr: {note}")
    manifest.sync(jobs)
    return sum(1 for j in manifest.rows(k for k, _ in jobs) if j["state"] == DONE)


def _final_report(
    manifest: Manifest,
    jobs: Sequence[tuple[str, Path]],
    problems: Sequence[tuple[str, str]],
    identity: ModelIdentity,
    stop: BaseException | None,
    out: Path,
    resumed: int,
    t_start: float,
) -> Report:
    """The report of a run that got to its jobs: a row per input (this run's and earlier
    runs', from the manifest), a failed row per input that could not be read, the exit code
    and why the run stopped early, if it did."""
    rows = [_row(j) for j in manifest.rows(k for k, _ in jobs)]
    ident = {
        "model_name": identity.name,
        "model_version": identity.version,
        "weights_sha256": identity.weights_sha256,
    }
    rows += [
        {"key": None, "input": p, "status": FAILED, "outputs": [], "error": r, **ident}
        for p, r in problems
    ]
    exit_code = EXIT_OK
    if isinstance(stop, UnreachableError):
        exit_code = EXIT_UNREACHABLE
    elif isinstance(stop, ModelChangedError):
        exit_code = EXIT_USAGE
    elif stop is not None or any(r["status"] in (FAILED, PENDING) for r in rows):
        exit_code = EXIT_INPUT_FAILED
    return Report(
        rows, identity, exit_code, _stop_message(stop, out), time.perf_counter() - t_start,
        resumed=resumed,
    )  # fmt: skip


def _stop_message(stop: BaseException | None, out: Path) -> str:
    if stop is None:
        return ""
    if isinstance(stop, DiskFullError):
        return (
            f"stopped: output disk full ({stop.strerror}); the manifest in {out} is intact: "
            "free some space and re-run the same command to finish"
        )
    if isinstance(stop, UnreachableError):
        return f"stopped: server unreachable: {stop}; re-run the same command to finish"
    return f"stopped: {stop}"


def _run(
    manifest: Manifest,
    worker: Worker,
    jobs: Sequence[tuple[str, Path]],
    concurrency: int,
    say: Callable[[str], None],
    bar_disable: bool | None,
) -> BaseException | None:
    """Run the pending jobs, ``concurrency`` at a time, recording each in the manifest as it
    ends. Returns why the run stopped early (disk full, unreachable, interrupted) or None."""
    todo = [(k, p) for k, p in jobs if manifest.state(k) == PENDING]
    bar = tqdm(
        total=len(jobs),
        initial=len(jobs) - len(todo),
        desc="cxr-sr",
        unit="image",
        disable=bar_disable,
    )
    stop: BaseException | None = None
    tally: dict[str, int] = {}  # states of this run's finished jobs, on the progress bar
    running: dict[Future, str] = {}
    it = iter(todo)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="cxr-sr") as ex:
        try:
            while True:
                while stop is None and len(running) < concurrency:
                    nxt = next(it, None)
                    if nxt is None:
                        break
                    key, path = nxt
                    manifest.start(key)
                    running[ex.submit(worker, key, path)] = key
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    key = running.pop(fut)
                    why = _record(manifest, worker, key, fut, say)
                    if why is not None and stop is None:
                        stop = why
                        say(f"cxr-sr: {_stop_message(why, worker.out)}")
                    tally[manifest.state(key)] = tally.get(manifest.state(key), 0) + 1
                    bar.set_postfix_str(", ".join(f"{n} {s}" for s, n in tally.items()))
                    bar.update(1)
        except KeyboardInterrupt as e:
            stop = e
            for fut, key in running.items():
                fut.cancel()
                manifest.release(key)
            raise
        except sqlite3.Error as e:
            if not is_disk_full(e):
                raise
            stop = DiskFullError(errno.ENOSPC, f"manifest: {e}")
        finally:
            bar.close()
    return stop


def _record(
    manifest: Manifest, worker: Worker, key: str, fut: Future, say: Callable[[str], None]
) -> BaseException | None:
    """Record one finished job; returns the error that must stop the run, if any."""
    try:
        outputs, row = fut.result()
    except OutOfDomainError as e:
        manifest.finish(key, SKIPPED, error=str(e), model=worker.model)
        say(f"skipped: {key}: {e}")
        return None
    except (DiskFullError, UnreachableError, ModelChangedError) as e:
        manifest.release(key)
        return e
    except (ValueError, SRServerError) as e:
        manifest.finish(key, FAILED, error=str(e), model=worker.model)
        say(f"failed: {key}: {e}")
        return None
    except Exception as e:  # a bug or an unexpected library error: this input fails
        if is_disk_full(e):
            manifest.release(key)
            return DiskFullError(getattr(e, "errno", errno.ENOSPC), str(e))
        manifest.finish(key, FAILED, error=f"{type(e).__name__}: {e}", model=worker.model)
        say(f"failed: {key}: {type(e).__name__}: {e}")
        return None
    manifest.finish(key, DONE, outputs=outputs, row=row, model=worker.model)
    return None
