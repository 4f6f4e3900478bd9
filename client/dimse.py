"""DICOM networking (DIMSE) with pynetdicom: C-ECHO and C-STORE as a user, and a C-STORE
provider that spools what it receives.

    peer = Peer.parse("PACS@10.0.0.5:104")
    echo(peer, calling_ae="CXRSR")                   # raises unless the peer answers
    send(datasets, peer, calling_ae="CXRSR")         # C-STORE every dataset, one association

    scp = StoreSCP(spool_dir, ae_title="CXRSR", port=11112, on_stored=queue.put)
    scp.start()                                      # bound to 127.0.0.1 by default
    ...
    scp.stop()

:class:`StoreSCP` writes each received instance to its spool folder durably (a temporary
file, ``fsync``, an atomic rename, ``fsync`` of the folder) *before* it answers Success, so
an instance the sender saw acknowledged survives a crash of this process; the file is named
by the instance's SOP Instance UID (checked to be a UID, never a raw tag value).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from cxr_sr.client.pacs import PacsError, PacsUnreachableError

log = logging.getLogger(__name__)

DEFAULT_AE_TITLE = "CXRSR"
# C-STORE status codes (PS3.4 Annex B.2.3, PS3.7 C)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
_WARNINGS = (0x0001, 0xB000, 0xB006, 0xB007)
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_AE_TITLE = re.compile(r"^[ -~]{1,16}$")  # printable ASCII, 1-16 characters, no backslash


def check_ae_title(title: str) -> str:
    """An AE title as DICOM allows it (1-16 printable ASCII characters, no backslash and not
    only spaces); raises ``ValueError`` otherwise."""
    if not _AE_TITLE.match(title) or "\\" in title or not title.strip():
        raise ValueError(f"AE title must be 1-16 printable ASCII characters, got {title!r}")
    return title.strip()


@dataclass(frozen=True)
class Peer:
    """A remote DICOM application entity: AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        check_ae_title(self.ae_title)
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")

    @classmethod
    def parse(cls, text: str) -> Peer:
        """``AET@HOST:PORT`` (e.g. ``ORTHANC@127.0.0.1:4242``)."""
        aet, at, address = text.rpartition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and aet and host and port.isdigit()):
            raise ValueError(f"expected AET@HOST:PORT, got {text!r}")
        return cls(aet, host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _ae(calling_ae: str, timeout_s: float) -> AE:
    ae = AE(ae_title=check_ae_title(calling_ae))
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def _associate(ae: AE, peer: Peer):
    assoc = ae.associate(peer.host, int(peer.port), ae_title=peer.ae_title)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        why = "association rejected (check our AE title is registered there and the called AE)"
    else:
        why = _connect_problem(peer) or "association aborted by the peer"
    raise PacsUnreachableError(f"DICOM {peer}: {why}")


def _connect_problem(peer: Peer, timeout_s: float = 5.0) -> str | None:
    """Why a TCP connection to ``peer`` fails, or None when it succeeds."""
    try:
        with socket.create_connection((peer.host, int(peer.port)), timeout=timeout_s):
            return None
    except OSError as e:
        return f"no answer ({e.strerror or type(e).__name__})"


def echo(peer: Peer, *, calling_ae: str = DEFAULT_AE_TITLE, timeout_s: float = 10.0) -> None:
    """C-ECHO ``peer``; raises :class:`PacsUnreachableError` or :class:`PacsError`."""
    ae = _ae(calling_ae, timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(getattr(status, "Status", -1)) if status else -1
    if code != STATUS_SUCCESS:
        raise PacsError(f"DICOM {peer}: C-ECHO failed (status {_hex(code)})")


def _hex(code: int) -> str:
    return "none" if code < 0 else f"0x{code:04X}"


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(getattr(meta, "TransferSyntaxUID", "") or ExplicitVRLittleEndian)


def _with_meta(ds: Dataset) -> Dataset:
    """``ds`` with the file meta pynetdicom needs to pick a presentation context."""
    if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None):
        return ds
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _header(item: Dataset | str | os.PathLike) -> tuple[str, str, str]:
    """(SOP class, SOP instance UID, transfer syntax) of a dataset or a DICOM file (read
    without its pixel data)."""
    if isinstance(item, Dataset):
        return str(item.SOPClassUID), str(item.SOPInstanceUID), _transfer_syntax(item)
    try:
        ds = dcmread(item, stop_before_pixels=True)
        return str(ds.SOPClassUID), str(ds.SOPInstanceUID), _transfer_syntax(ds)
    except (InvalidDicomError, OSError, AttributeError) as e:
        raise ValueError(f"{item}: not a DICOM instance that can be sent ({e})") from None


def send(
    items: Sequence[Dataset | str | os.PathLike],
    peer: Peer,
    *,
    calling_ae: str = DEFAULT_AE_TITLE,
    timeout_s: float = 60.0,
) -> int:
    """C-STORE every dataset (or DICOM file: read one at a time while sending, so memory
    holds one instance) to ``peer`` over one association; returns how many were stored.

    The association proposes each (SOP class, transfer syntax) the instances use, plus the
    uncompressed syntaxes. Raises ``ValueError`` for a file that is not a DICOM instance,
    :class:`PacsUnreachableError` when no association can be made and :class:`PacsError`
    naming each instance the peer refused (warnings are logged and count as stored).
    """
    items = [_with_meta(x) if isinstance(x, Dataset) else x for x in items]
    if not items:
        return 0
    headers = [_header(x) for x in items]
    ae = _ae(calling_ae, timeout_s)
    syntaxes: dict[str, set[str]] = {}
    for sop_class, _, syntax in headers:
        syntaxes.setdefault(sop_class, set()).add(syntax)
    if len(syntaxes) > 127:
        raise ValueError(f"{len(syntaxes)} SOP classes in one send: at most 127 per association")
    for sop_class, used in syntaxes.items():
        wanted = sorted(used | {ExplicitVRLittleEndian, ImplicitVRLittleEndian})
        ae.add_requested_context(sop_class, wanted)
    assoc = _associate(ae, peer)
    failed: list[str] = []
    try:
        for item, (_, uid, _) in zip(items, headers, strict=True):
            try:
                status = assoc.send_c_store(item)
            except ValueError as e:  # no accepted presentation context for this dataset
                failed.append(f"{uid} ({e})")
                continue
            if not assoc.is_established:
                raise PacsUnreachableError(f"DICOM {peer}: association lost while sending {uid}")
            code = int(getattr(status, "Status", -1)) if status else -1
            if code in _WARNINGS:
                log.warning("DICOM %s: C-STORE %s stored with warning %s", peer, uid, _hex(code))
            elif code != STATUS_SUCCESS:
                failed.append(f"{uid} (status {_hex(code)})")
    finally:
        if assoc.is_established:
            assoc.release()
    if failed:
        raise PacsError(f"DICOM {peer}: C-STORE refused {len(failed)}: {'; '.join(failed)}")
    return len(items)


def spool_name(sop_instance_uid: str) -> str:
    """The spool file name of an instance: its UID when it is one, else a hash of it."""
    uid = str(sop_instance_uid).strip()
    if _UID.match(uid) and len(uid) <= 64:
        return f"{uid}.dcm"
    return f"x{hashlib.sha256(uid.encode()).hexdigest()[:40]}.dcm"


def write_durably(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that it is whole on disk once this returns: a temporary
    file in the same folder, fsync, atomic rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


@dataclass(frozen=True)
class Received:
    """One instance the SCP stored: its spool file and who sent it."""

    path: Path
    sop_instance_uid: str
    calling_ae: str


class StoreSCP:
    """A C-STORE (and C-ECHO) provider that spools every received instance to ``spool``.

    Args:
        spool: folder for received instances (created).
        ae_title: our AE title; associations calling another title are rejected.
        host: address to bind (127.0.0.1 by default; 0.0.0.0 to accept other machines).
        port: TCP port (0: a free one, see :attr:`port` after :meth:`start`).
        on_stored: called with a :class:`Received` after each instance is on disk and
            before Success is answered (keep it quick: e.g. put it on a queue).
        allowed_aes: calling AE titles accepted (empty: any).
        timeout_s: ACSE/DIMSE/network timeouts.
    """

    def __init__(
        self,
        spool: str | os.PathLike,
        *,
        ae_title: str = DEFAULT_AE_TITLE,
        host: str = "127.0.0.1",
        port: int = 11112,
        on_stored: Callable[[Received], None] | None = None,
        allowed_aes: Iterable[str] = (),
        timeout_s: float = 60.0,
    ) -> None:
        self.spool = Path(spool)
        self.ae_title = check_ae_title(ae_title)
        self.host = host
        self._port = int(port)
        self.on_stored = on_stored
        self.allowed_aes = [check_ae_title(a) for a in allowed_aes]
        self.timeout_s = timeout_s
        self._server = None

    @property
    def port(self) -> int:
        if self._server is not None:
            return int(self._server.server_address[1])
        return self._port

    def start(self) -> StoreSCP:
        self.spool.mkdir(parents=True, exist_ok=True)
        ae = _ae(self.ae_title, self.timeout_s)
        ae.require_called_aet = True
        if self.allowed_aes:
            ae.require_calling_aet = self.allowed_aes
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._handle_store)]
        try:
            self._server = ae.start_server(
                (self.host, self._port), block=False, evt_handlers=handlers
            )
        except OSError as e:
            raise OSError(f"cannot listen on {self.host}:{self._port}: {e.strerror}") from None
        log.debug("listening as %s on %s:%d", self.ae_title, self.host, self.port)
        return self

    def stop(self) -> None:
        """Stop accepting associations and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handle_store(self, event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            data = event.encoded_dataset(include_meta=True)
            path = write_durably(self.spool / spool_name(uid), data)
        except OSError as e:
            log.error("C-STORE %s from %s: could not spool it (%s)", uid, calling, e)
            return STATUS_OUT_OF_RESOURCES
        except Exception as e:  # a malformed request: refuse this instance, keep serving
            log.error("C-STORE %s from %s: cannot read it (%s)", uid, calling, e)
            return STATUS_CANNOT_UNDERSTAND
        log.info("received %s from %s", uid, calling)
        if self.on_stored is not None:
            self.on_stored(Received(path, uid, calling))
        return STATUS_SUCCESS
