"""A real Orthanc PACS for the tests (Debian ``orthanc`` + ``orthanc-dicomweb``).

    with Orthanc(tmp_path, modalities={"CXRSR": ("CXRSR", "127.0.0.1", 11112)}) as pacs:
        pacs.upload(path)                     # REST POST /instances
        pacs.dicomweb_url                     # http://127.0.0.1:<port>/dicom-web
        pacs.push("CXRSR", study_uid)         # Orthanc C-STOREs a study to a modality

Orthanc starts from a temporary JSON configuration: storage and index under ``root``, free
HTTP and DICOM ports, the DICOMweb plugin, HTTP basic authentication with one user (so the
tests exercise credentials), ``OverwriteInstances`` (a re-sent instance replaces itself, as
PACS are usually configured for derived objects), and ``DicomModalities`` naming the AEs it
may push to. Loopback only, as far as Orthanc 1.10 allows: ``RemoteAccessAllowed: false``
makes its HTTP server refuse every client but 127.0.0.1, but neither the HTTP nor the DICOM
listener has a bind-address option in 1.10 (both listen on every interface); the DICOM side
answers only the modalities it knows, from their own host (``DicomAlwaysAllowEcho`` and
``DicomAlwaysAllowStore`` off, ``DicomCheckModalityHost`` on): the tests call it as
``CXRSR`` from 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import requests
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from cxr_sr.builders.serve import _die_with_parent, free_port
from cxr_sr.client.dicom import derive_instance
from cxr_sr.client.io import dataset_image

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "cxr", "orthanc-test-secret-4f1c"


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    missing = [p for p in (ORTHANC, DICOMWEB_PLUGIN) if not Path(p).is_file()]
    if not shutil.which(ORTHANC) and ORTHANC not in missing:
        missing.append(ORTHANC)
    if missing:
        return "missing " + ", ".join(missing) + " (system-packages.txt: orthanc, orthanc-dicomweb)"
    return None


class Orthanc:
    """An Orthanc process on free ports, configured from a temporary JSON file under ``root``.

    ``modalities``: name -> (AE title, host, port) of the DICOM nodes Orthanc may send to
    (and accept C-STORE from). ``aet``: Orthanc's own AE title.
    """

    def __init__(
        self,
        root: Path,
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.auth = (USER, PASSWORD)
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict:
        storage = self.root / "storage"
        return {
            "Name": "cxr-sr-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomModalities": {
                name: {"AET": aet, "Host": host, "Port": port}
                for name, (aet, host, port) in self.modalities.items()
            },
            "OverwriteInstances": True,
            "StableAge": 1,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 2,
        }

    def start(self, timeout_s: float = 60.0) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.root / "orthanc.log", "w")  # noqa: SIM115 (closed by the process' end)
        t0 = time.perf_counter()
        self.process = subprocess.Popen(
            [ORTHANC, str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with code {self.process.returncode}:\n{self.log()}"
                )
            try:
                r = requests.get(f"{self.url}/system", auth=self.auth, timeout=1)
                if r.status_code == 200:
                    self.start_seconds = time.perf_counter() - t0
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc not ready within {timeout_s:g} s:\n{self.log()}")

    def log(self, lines: int = 30) -> str:
        path = self.root / "orthanc.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.is_file() else ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # REST helpers (Orthanc's own API, for arranging and checking a test)

    def get(self, path: str) -> object:
        r = requests.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: object) -> object:
        data = body if isinstance(body, bytes) else json.dumps(body)
        r = requests.post(f"{self.url}{path}", data=data, auth=self.auth, timeout=120)
        r.raise_for_status()
        return r.json()

    def upload(self, path: Path) -> str:
        """Store one DICOM file; returns its Orthanc instance id."""
        return self.post("/instances", Path(path).read_bytes())["ID"]

    def clear(self) -> None:
        """Delete every patient (and so every study, series and instance)."""
        for pid in self.get("/patients"):
            requests.delete(f"{self.url}/patients/{pid}", auth=self.auth, timeout=30)

    def study_id(self, study_uid: str) -> str:
        found = self.post("/tools/lookup", study_uid.encode())
        ids = [f["ID"] for f in found if f["Type"] == "Study"]
        if not ids:
            raise KeyError(f"no study {study_uid} in Orthanc")
        return ids[0]

    def instances(self, study_uid: str) -> list[dict]:
        """Every instance of a study, each with its tags (``simplified-tags``)."""
        sid = self.study_id(study_uid)
        return [
            self.get(f"/instances/{i['ID']}/simplified-tags")
            for i in self.get(f"/studies/{sid}/instances")
        ]

    def instance_file(self, sop_uid: str) -> bytes:
        found = self.post("/tools/lookup", sop_uid.encode())
        ids = [f["ID"] for f in found if f["Type"] == "Instance"]
        if not ids:
            raise KeyError(f"no instance {sop_uid} in Orthanc")
        r = requests.get(f"{self.url}/instances/{ids[0]}/file", auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.content

    def push(self, modality: str, study_uid: str) -> dict:
        """Have Orthanc C-STORE a whole study to a registered modality (synchronously)."""
        return self.post(f"/modalities/{modality}/store", {"Resources": [self.study_id(study_uid)]})


# Small test studies: a real radiograph made small, and a CT-like slice in the same study


def _uid(*parts: str) -> str:
    return generate_uid(entropy_srcs=["cxr-sr tests", *parts])


def small_radiograph(path: Path, factor: int = 20) -> Path:
    """pydicom-data's RG1_UNCI.dcm (CR chest PA, 1955 x 1841, 15-bit MONOCHROME1) as a new
    instance of its study, ``factor`` times smaller by block averaging (97 x 92 at 20), with
    Pixel Spacing and Imager Pixel Spacing (0.16 mm x ``factor``) set; its patient, study and
    display attributes are kept."""
    src = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    pixels = src.pixel_array
    h, w = (s // factor for s in pixels.shape)
    small = pixels[: h * factor, : w * factor].reshape(h, factor, w, factor).mean(axis=(1, 3))
    ds = src
    del ds.ImageComments
    ds.SOPInstanceUID = _uid("rg1 small", str(factor))
    ds.SeriesInstanceUID = _uid("rg1 small series")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows, ds.Columns = h, w
    spacing = round(0.16 * factor, 4)
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelData = np.rint(small).astype(np.uint16).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def ct_slice(path: Path, study: Path, size: int = 32) -> Path:
    """A small CT Image Storage instance in the same study as the DICOM file ``study``
    (outside the model's domain: the study's CT must be skipped, not upscaled)."""
    src = pydicom.dcmread(study, stop_before_pixels=True)
    ds = Dataset()
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyDescription",
    ):
        if keyword in src:
            setattr(ds, keyword, src[keyword].value)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = _uid("ct slice")
    ds.SeriesInstanceUID = _uid("ct series")
    ds.Modality = "CT"
    ds.BodyPartExamined = "HEAD"
    ds.SeriesNumber, ds.InstanceNumber = 2, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = (np.arange(size * size, dtype=np.uint16) % 4096).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# What a derived instance read back from the PACS must be


def expected_derived(client, source: Dataset, **sampling) -> Dataset:
    """The derived instance of ``source`` made directly: ``SRClient.upscale`` of its pixels
    (as ``client.io`` reads them), encoded by ``client.dicom.derive_instance``."""
    sr = client.upscale(dataset_image(source), **sampling)
    return derive_instance(source, sr, client.model_identity())


def assert_derived(derived: Dataset, source: Dataset, expected: Dataset) -> None:
    """Same study, a new series, the source referenced, 4x the size, spacing / 4, the
    deterministic UIDs and exactly the expected pixels."""
    assert derived.StudyInstanceUID == source.StudyInstanceUID
    assert derived.SeriesInstanceUID != source.SeriesInstanceUID
    assert derived.SeriesInstanceUID == expected.SeriesInstanceUID
    assert derived.SOPInstanceUID == expected.SOPInstanceUID
    assert derived.PatientID == source.PatientID
    assert list(derived.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    (ref,) = derived.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ref.ReferencedSOPClassUID == source.SOPClassUID
    assert (derived.Rows, derived.Columns) == (4 * source.Rows, 4 * source.Columns)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        np.testing.assert_allclose(
            [float(v) for v in derived[keyword].value],
            [float(v) / 4 for v in source[keyword].value],
            rtol=1e-6,
        )
    np.testing.assert_array_equal(derived.pixel_array, expected.pixel_array)
