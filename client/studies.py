"""Whole studies in, derived series out: ``submit_study`` and the places results go.

    report = submit_study("study_folder/", url="127.0.0.1:8000", out="derived/")
    report = submit_study("1.2.840...", url="127.0.0.1:8000",
                          pacs="https://pacs/dicom-web")       # WADO-RS in, STOW-RS back
    report = submit_study("study/", url="127.0.0.1:8000",
                          pacs=Peer.parse("PACS@10.0.0.5:104"))  # C-STORE the derived series

Every instance of the study is read, checked against the model's domain
(``client.dicom.domain_problem``: CT, MR, US ... and non-chest body parts are skipped with
their reason unless ``force``), upscaled at its own geometry and made a derived instance of
the same study (``client.dicom.upscale_dataset``: deterministic UIDs, so a re-run replaces
its earlier result in the PACS instead of duplicating it), then delivered at once to each
destination: a DICOMweb server (STOW-RS), a DICOM node (C-STORE) and/or a folder.

A :class:`Destination` is what the node mode (``client.node``) delivers to as well; parse one
from the command line with :func:`parse_destination` (``dimse:AET@HOST:PORT``,
``dicomweb:URL`` or ``folder:PATH``).
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_sr.client.dicom import dicom_file_name, domain_problem, safe_name, upscale_dataset
from cxr_sr.client.dimse import DEFAULT_AE_TITLE, Peer, send, write_durably
from cxr_sr.client.io import is_dicom, iter_inputs
from cxr_sr.client.pacs import Credentials, DicomWebPacs, PacsError, credentials_from_env
from cxr_sr.client.triton import DEFAULT_IN_FLIGHT, SRClient, SRConnectionError, SRServerError

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"


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


@dataclass
class InstanceResult:
    """One source instance's outcome (a row of the report)."""

    source: str  # file path, or "<study>/<SOP Instance UID>" for a PACS source
    sop_instance_uid: str = ""
    modality: str = ""
    status: str = FAILED
    reason: str = ""  # why skipped or failed
    size: str = ""  # source Rows x Columns
    out_size: str = ""
    derived_series_uid: str = ""
    derived_sop_instance_uid: str = ""
    seconds: float | None = None
    delivered_to: list[str] = field(default_factory=list)


def _size(ds: Dataset) -> str:
    return f"{int(ds.get('Rows', 0) or 0)}x{int(ds.get('Columns', 0) or 0)}"


def process_instance(
    client: SRClient,
    ds: Dataset,
    source: str,
    destinations: Sequence[Destination],
    *,
    force: bool = False,
    model=None,
    upscale: dict[str, Any] | None = None,
) -> InstanceResult:
    """Check, upscale, derive and deliver one source instance; never raises for a problem
    with this instance (it goes into the result). Raises ``SRConnectionError`` when the
    server is gone and ``PacsUnreachableError`` when a destination is: the caller stops."""
    row = InstanceResult(
        source=source,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        size=_size(ds),
    )
    problem = domain_problem(ds)
    if problem and not force:
        row.status, row.reason = SKIPPED, problem
        log.info("skipped %s: %s", source, problem)
        return row
    t0 = time.perf_counter()
    try:
        derived = upscale_dataset(client, ds, model, **(upscale or {}))
    except SRConnectionError:
        raise
    except (ValueError, SRServerError) as e:
        row.reason = str(e)
        log.warning("failed %s: %s", source, e)
        return row
    row.seconds = time.perf_counter() - t0
    row.out_size = _size(derived)
    row.derived_series_uid = str(derived.SeriesInstanceUID)
    row.derived_sop_instance_uid = str(derived.SOPInstanceUID)
    for dest in destinations:
        try:
            dest.send([derived])
        except PacsError as e:
            if type(e) is not PacsError:  # PacsUnreachableError: stop the run
                raise
            row.reason = str(e)
            return row
        except OSError as e:  # a folder destination
            row.reason = f"{dest}: {e}"
            return row
        row.delivered_to.append(str(dest))
    row.status = DONE
    return row


def read_study_files(
    paths: Iterable[str | os.PathLike],
) -> tuple[list[tuple[str, Dataset]], list[InstanceResult]]:
    """(source name, dataset) for every DICOM file under ``paths``; unreadable ones as failed
    results. Non-DICOM files in a folder are ignored; a non-DICOM file given by name fails."""
    found, failed = [], []
    for f in iter_inputs(paths):
        if not is_dicom(f):
            failed.append(InstanceResult(str(f), reason="not a DICOM file"))
            continue
        try:
            found.append((str(f), pydicom.dcmread(f)))
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as e:
            failed.append(InstanceResult(str(f), reason=f"not a readable DICOM file ({e})"))
    return found, failed


def _looks_like_uid(text: str) -> bool:
    return bool(text) and all(part.isdigit() for part in text.split(".")) and len(text) <= 64


def _destinations(pacs, out) -> list[Destination]:
    dests: list[Destination] = []
    if isinstance(pacs, DicomWebPacs):
        dests.append(DicomWebDestination(pacs))
    elif isinstance(pacs, Peer):
        dests.append(DimseDestination(pacs))
    elif pacs is not None:
        dests.append(pacs)  # any Destination
    if out is not None:
        dests.append(FolderDestination(Path(out)))
    return dests


def submit_study(
    path_or_uid: str | os.PathLike,
    *,
    url: str = "127.0.0.1:8000",
    pacs: DicomWebPacs | Peer | Destination | str | None = None,
    out: str | os.PathLike | None = None,
    force: bool = False,
    protocol: str = "http",
    model: str = "cxr_sr",
    timeout_s: float = 300.0,
    in_flight: int = DEFAULT_IN_FLIGHT,
    progress: Callable[[InstanceResult], None] | None = None,
    **sampling: Any,
) -> dict[str, Any]:
    """Super-resolve one study and deliver its derived series; returns the report.

    Args:
        path_or_uid: a DICOM file or study folder, or a Study Instance UID to retrieve from
            ``pacs`` over DICOMweb (WADO-RS).
        url: the Triton server (``host:port``).
        pacs: where the derived series goes (and, for a UID, where the study comes from):
            a :class:`DicomWebPacs` or its URL (credentials from the environment; STOW-RS),
            a :class:`Peer` or ``"AET@HOST:PORT"`` (C-STORE), or any :class:`Destination`.
        out: also write the derived instances under this folder.
        force: upscale inputs outside the model's domain instead of skipping them.
        protocol, model, timeout_s, in_flight: the :class:`SRClient`'s.
        progress: called with each instance's result as it is done.
        sampling: request-schema keywords (``steps``, ``seed``, ...).

    Returns a dict: ``study`` (source, UIDs), ``model`` (name, version, weights hash),
    ``destinations``, ``instances`` (one row per source instance: status done / skipped /
    failed with the reason, sizes, derived UIDs, seconds) and ``counts``. Raises
    ``ValueError`` for bad arguments, ``SRConnectionError`` when the server cannot be
    reached and ``PacsUnreachableError`` when the PACS cannot.
    """
    if isinstance(pacs, str):
        if pacs.startswith(("http://", "https://")):
            pacs = DicomWebPacs(pacs, credentials_from_env())
        else:
            pacs = Peer.parse(pacs)
    destinations = _destinations(pacs, out)
    if not destinations:
        raise ValueError("nowhere to deliver the derived series: give pacs= and/or out=")
    text = os.fspath(path_or_uid)
    if Path(text).exists():
        sources, rows = read_study_files([text])
    elif _looks_like_uid(text):
        if not isinstance(pacs, DicomWebPacs):
            raise ValueError(f"{text} is a UID: retrieving a study needs a DICOMweb pacs=")
        sources = [(f"{text}/{ds.SOPInstanceUID}", ds) for ds in pacs.retrieve_study(text)]
        rows = []
    else:
        raise ValueError(f"{text}: no such file or folder, and not a Study Instance UID")
    if not sources and not rows:
        raise ValueError(f"{text}: no DICOM instances found")

    with SRClient(url, protocol, model, timeout_s=timeout_s, in_flight=in_flight) as client:
        identity = client.model_identity()
        for name, ds in sources:
            row = process_instance(
                client, ds, name, destinations, force=force, model=identity, upscale=sampling
            )
            rows.append(row)
            if progress is not None:
                progress(row)
    return study_report(text, sources, rows, identity, destinations)


def study_report(source: str, sources, rows, identity, destinations) -> dict[str, Any]:
    """The report dict of one study run (see :func:`submit_study`)."""
    study_uids = sorted({str(ds.get("StudyInstanceUID", "")) for _, ds in sources})
    counts = {s: sum(r.status == s for r in rows) for s in (DONE, SKIPPED, FAILED)}
    return {
        "study": {"source": source, "study_instance_uids": study_uids},
        "model": {
            "name": identity.name,
            "version": identity.version,
            "weights_sha256": identity.weights_sha256,
        },
        "destinations": [str(d) for d in destinations],
        "instances": [vars(r) for r in rows],
        "counts": counts,
    }
