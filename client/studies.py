"""Whole studies in, derived series out: ``submit_study`` and the places results go.

    report = submit_study("study_folder/", url="127.0.0.1:8000", out="derived/")
    report = submit_study("1.2.840...", url="127.0.0.1:8000",
                          pacs="https://pacs/dicom-web")       # WADO-RS in, STOW-RS back
    report = submit_study("study/", url="127.0.0.1:8000",
                          pacs=Peer.parse("PACS@10.0.0.5:104"))  # C-STORE the derived series

A study (a folder of DICOM files, or a Study Instance UID retrieved over WADO-RS) goes
through the batch engine (``client.batch.run_batch``: job manifest, retries, report), which
skips instances outside the model's domain with their reason unless forced, and writes each
chest radiograph's derived instance (``client.dicom``: same study, new series, UIDs fixed by
the source and the model, so a re-run replaces its earlier result in the PACS instead of
duplicating it); :func:`deliver` then sends every derived instance to each destination: a
DICOMweb server (STOW-RS), a DICOM node (C-STORE) and/or a folder.

A :class:`Destination` is what the node mode (``client.node``) delivers to as well; parse one
from the command line with :func:`parse_destination` (``dimse:AET@HOST:PORT``,
``dicomweb:URL`` or ``folder:PATH``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_sr.client.batch import Report, run_batch, write_report
from cxr_sr.client.dicom import dicom_file_name, safe_name
from cxr_sr.client.dimse import DEFAULT_AE_TITLE, Peer, send, write_durably
from cxr_sr.client.exit_codes import EXIT_INPUT_FAILED, EXIT_UNREACHABLE
from cxr_sr.client.manifest import DONE, FAILED
from cxr_sr.client.pacs import (
    Credentials,
    DicomWebPacs,
    PacsError,
    PacsUnreachableError,
    credentials_from_env,
)

DERIVED_SUFFIX = "_sr.dcm"  # run_batch's name for the derived instance of an input


class Destination(Protocol):
    """Where derived instances go; ``send`` delivers them all or raises ``PacsError``."""

    def send(self, datasets: Sequence[Dataset]) -> int: ...


@dataclass
class DicomWebDestination:
    """STOW-RS to a DICOMweb server."""

    pacs: DicomWebPacs

    def send(self, datasets: Sequence[Dataset]) -> int:
        return self.pacs.store(datasets)

    def __str__(self) -> str:
        return f"dicomweb:{self.pacs.url}"


@dataclass
class DimseDestination:
    """C-STORE to a DICOM node, calling as ``calling_ae``."""

    peer: Peer
    calling_ae: str = DEFAULT_AE_TITLE
    timeout_s: float = 60.0

    def send(self, datasets: Sequence[Dataset]) -> int:
        return send(datasets, self.peer, calling_ae=self.calling_ae, timeout_s=self.timeout_s)

    def __str__(self) -> str:
        return f"dimse:{self.peer}"


@dataclass
class FolderDestination:
    """DICOM files ``<folder>/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` (names sanitized),
    written durably; a re-run overwrites its own files."""

    folder: Path

    def path(self, ds: Dataset) -> Path:
        study = safe_name(str(ds.get("StudyInstanceUID", "")), "study")
        return Path(self.folder) / study / dicom_file_name(ds)

    def send(self, datasets: Sequence[Dataset]) -> int:
        for ds in datasets:
            path = self.path(ds)
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            write_durably(path, buffer.getvalue())
        return len(datasets)

    def __str__(self) -> str:
        return f"folder:{self.folder}"


def parse_destination(
    text: str,
    *,
    calling_ae: str = DEFAULT_AE_TITLE,
    credentials: Credentials | None = None,
    timeout_s: float = 60.0,
) -> Destination:
    """A destination from ``dimse:AET@HOST:PORT``, ``dicomweb:http(s)://...`` (or a bare
    http(s) URL) or ``folder:PATH``. DICOMweb credentials: ``credentials``, else the
    environment (:func:`client.pacs.credentials_from_env`)."""
    kind, colon, rest = text.partition(":")
    if text.startswith(("http://", "https://")):
        kind, rest = "dicomweb", text
    if kind == "dimse" and colon:
        return DimseDestination(Peer.parse(rest), calling_ae, timeout_s)
    if kind == "dicomweb" and colon:
        creds = credentials if credentials is not None else credentials_from_env()
        return DicomWebDestination(DicomWebPacs(rest, creds, timeout_s=timeout_s))
    if kind == "folder" and colon and rest:
        return FolderDestination(Path(rest))
    raise ValueError(
        f"destination {text!r}: expected dimse:AET@HOST:PORT, dicomweb:URL or folder:PATH"
    )


def fetch_study(pacs: DicomWebPacs, study_uid: str, folder: str | os.PathLike) -> Path:
    """Retrieve a study (WADO-RS) into ``folder`` as ``<SOPInstanceUID>.dcm`` files (names
    sanitized, each written whole or not at all); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for ds in pacs.iter_study(study_uid):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        write_durably(folder / dicom_file_name(ds), buffer.getvalue())
    return folder


def derived_file(row: dict[str, Any]) -> Path | None:
    """The derived DICOM a report row's input became (``run_batch``'s ``_sr.dcm`` output)."""
    for output in row.get("outputs") or ():
        if str(output).endswith(DERIVED_SUFFIX):
            return Path(output)
    return None


def deliver(report: Report, destinations: Sequence[Destination]) -> None:
    """Send the derived instance of every done row of ``report`` to each destination.

    Each row gets ``delivered_to`` (the destinations that took it). A destination that
    refuses an instance makes its row failed (``error`` says why) and the exit code 1; one
    that cannot be reached stops the delivery with exit code 3 and the report's message
    (rows already delivered keep their ``delivered_to``; deterministic UIDs make a re-run
    replace them, never duplicate).
    """
    for row in report.rows:
        if row.get("status") != DONE:
            continue
        row["delivered_to"] = []
        path = derived_file(row)
        if path is None:
            continue
        try:
            ds = pydicom.dcmread(path)
        except (OSError, InvalidDicomError) as e:
            row["status"], row["error"] = FAILED, f"cannot read the derived instance {path}: {e}"
            report.exit_code = max(report.exit_code, EXIT_INPUT_FAILED)
            continue
        for dest in destinations:
            try:
                dest.send([ds])
            except PacsUnreachableError as e:
                report.exit_code = EXIT_UNREACHABLE
                report.message = f"stopped: {e}; re-run the same command to finish"
                return
            except (PacsError, OSError) as e:
                row["status"], row["error"] = FAILED, f"delivery to {dest} failed: {e}"
                report.exit_code = max(report.exit_code, EXIT_INPUT_FAILED)
                break
            row["delivered_to"].append(str(dest))


def _looks_like_uid(text: str) -> bool:
    return bool(text) and len(text) <= 64 and all(p.isdigit() for p in text.split("."))


def _destinations(pacs, dest) -> list[Destination]:
    found: list[Destination] = []
    for d in [pacs, *(dest or ())]:
        if d is None:
            continue
        if isinstance(d, str):
            d = parse_destination(d if ":" in d.split("@")[0] else f"dimse:{d}")
        if isinstance(d, DicomWebPacs):
            d = DicomWebDestination(d)
        elif isinstance(d, Peer):
            d = DimseDestination(d)
        found.append(d)
    return found


def submit_study(
    path_or_uid: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    url: str = "127.0.0.1:8000",
    pacs: DicomWebPacs | Peer | Destination | str | None = None,
    out: str | os.PathLike | None = None,
    dest: Sequence[Destination | str] = (),
    source: DicomWebPacs | None = None,
    force: bool = False,
    protocol: str = "http",
    model: str = "cxr_sr",
    concurrency: int = 1,
    timeout_s: float = 300.0,
    wait_s: float = 0.0,
    progress: bool | None = False,
    log: Callable[[str], None] | None = None,
    **sampling: Any,
) -> Report:
    """Super-resolve one study and deliver its derived series; returns the report.

    The study's instances go through ``client.batch.run_batch`` with DICOM output: each
    chest radiograph becomes a derived instance of the same study (``client.dicom``:
    deterministic UIDs, so a re-run replaces rather than duplicates), instances outside the
    model's domain (CT, MR, US ..., non-chest body parts) are skipped with their reason unless
    ``force``, transient server errors are retried with backoff, and the job manifest in
    ``out`` lets an interrupted run resume. The derived instances are then delivered
    (:func:`deliver`).

    Args:
        path_or_uid: a DICOM file or study folder (or a list of them), or a Study Instance
            UID to retrieve over DICOMweb (WADO-RS) from ``source``, else from ``pacs``.
        url: the Triton server (``host:port``).
        pacs: where the derived series goes (for a UID also where the study comes from):
            a :class:`DicomWebPacs` or an http(s) URL (credentials from the environment,
            STOW-RS), a :class:`Peer` or ``"AET@HOST:PORT"`` (C-STORE), or a
            :class:`Destination`.
        out: the run's folder: derived ``<stem>_sr.dcm`` files, the manifest and
            ``report.csv`` / ``report.json`` (a retrieved study is cached in
            ``out/source/``). Default: a temporary folder, removed at the end (the
            report's output paths then no longer exist).
        dest: more destinations (objects or ``parse_destination`` strings).
        source: the DICOMweb server a UID is retrieved from, when it is not ``pacs`` (e.g.
            to read from one server and C-STORE to another).
        force, protocol, model, concurrency, timeout_s, wait_s, progress, log: as
            ``run_batch``'s.
        sampling: request-schema keywords (``steps``, ``seed``, ...).

    Returns ``client.batch.Report``: one row per instance (status done / skipped / failed,
    error, sizes, outputs, ``delivered_to``, latency, model identity), ``exit_code``
    (``client.exit_codes``: 3 when the server or the PACS cannot be reached) and
    ``summary()``. Raises ``ValueError`` for bad arguments.
    """
    if isinstance(pacs, str) and pacs.startswith(("http://", "https://")):
        pacs = DicomWebPacs(pacs, credentials_from_env())
    destinations = _destinations(pacs, dest)
    if not destinations and out is None:
        raise ValueError("nowhere to deliver the derived series: give pacs=, dest= or out=")
    if isinstance(path_or_uid, (str, os.PathLike)):
        path_or_uid = [path_or_uid]
    texts = [os.fspath(p) for p in path_or_uid]
    source = source or (pacs if isinstance(pacs, DicomWebPacs) else None)
    uid = None
    if len(texts) == 1 and not Path(texts[0]).exists():
        uid = texts[0]
        if not _looks_like_uid(uid):
            raise ValueError(f"{uid}: no such file or folder, and not a Study Instance UID")
        if source is None:
            raise ValueError(f"{uid} is a UID: retrieving a study needs a DICOMweb pacs=")
    text = uid or ", ".join(texts)
    with contextlib.ExitStack() as stack:
        if out is None:
            out = stack.enter_context(tempfile.TemporaryDirectory(prefix="cxr-sr-study-"))
        out = Path(out)
        inputs = [Path(t) for t in texts]
        if uid is not None:
            try:
                inputs = [fetch_study(source, uid, out / "source" / safe_name(uid, "study"))]
            except PacsError as e:
                code = (
                    EXIT_UNREACHABLE if isinstance(e, PacsUnreachableError) else EXIT_INPUT_FAILED
                )
                return Report([], None, code, str(e))
        report = run_batch(
            inputs, out, [url], protocol=protocol, model=model, concurrency=concurrency,
            png=False, dicom=True, force=force, timeout_s=timeout_s, wait_s=wait_s,
            sampling=sampling, progress=progress, log=log,
            report_extra={"study": text, "destinations": [str(d) for d in destinations]},
        )  # fmt: skip
        if report.exit_code != EXIT_UNREACHABLE and destinations:
            deliver(report, destinations)
            with contextlib.suppress(OSError):
                extra = {"study": text, "destinations": [str(d) for d in destinations]}
                report.files = write_report(report, out, extra)
        return report
