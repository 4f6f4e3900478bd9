"""Node mode (``cxr-sr listen``) as a real process: a real Orthanc pushes a study to it over
C-STORE, the node super-resolves on the real tritonserver and C-STOREs the derived series
back; a spool left by a killed node is resumed; SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from orthanc import (
    PASSWORD,
    USER,
    assert_derived,
    ct_slice,
    expected_derived,
    small_radiograph,
)

from cxr_sr.builders.serve import free_port
from cxr_sr.client.pacs import ENV_PASSWORD, ENV_USER
from cxr_sr.client.triton import SRClient

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    rg = small_radiograph(folder / "rg.dcm")
    ct_slice(folder / "ct.dcm", rg)
    return folder


class Listener:
    """``cxr-sr listen`` in a subprocess, its log in a file; stopped with SIGTERM."""

    def __init__(self, spool: Path, orthanc, server, dest: str | None = None, env=None) -> None:
        self.log = spool.parent / f"{spool.name}.log"
        dest = dest or f"dimse:ORTHANC@127.0.0.1:{orthanc.dicom_port}"
        cmd = [sys.executable, "-m", "cxr_sr.client.cli", "listen", "--spool", str(spool),
               "--dest", dest, "--port", str(orthanc.node_port), "--url", server.http_url,
               "--steps", "1", "--seed", "0"]  # fmt: skip
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        self.wait_for("listening as CXRSR on 127.0.0.1")

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.text():
            assert self.process.poll() is None, f"the node exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {needle!r} in the node's log:\n{self.text()}"
            time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def _wait_instances(orthanc, study_uid: str, n: int, timeout_s: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = orthanc.instances(study_uid)
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _check_derived_in_orthanc(orthanc, server, rg, stored) -> None:
    (derived_uid,) = {i["SOPInstanceUID"] for i in stored if i["Modality"] != "CT"} - {
        rg.SOPInstanceUID
    }
    derived = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(derived_uid)))
    with SRClient(server.http_url) as client:
        assert_derived(derived, rg, expected_derived(client, rg, steps=1, seed=0))


def test_node_receives_a_pushed_study_and_sends_the_derived_series(
    orthanc, server, study, tmp_path
):
    orthanc.clear()
    rg = pydicom.dcmread(study / "rg.dcm")
    for f in ("rg.dcm", "ct.dcm"):
        orthanc.upload(study / f)
    spool = tmp_path / "spool"
    node = Listener(spool, orthanc, server)
    try:
        pushed = orthanc.push("CXRSR", rg.StudyInstanceUID)  # Orthanc C-STOREs to the node
        assert pushed["InstancesCount"] == 2 and pushed["FailedInstancesCount"] == 0
        stored = _wait_instances(orthanc, rg.StudyInstanceUID, 3)
        assert len(stored) == 3, node.text()
        _check_derived_in_orthanc(orthanc, server, rg, stored)
        node.wait_for("skipped")
        # pushed again: processed afresh, and the derived instance replaces itself
        orthanc.push("CXRSR", rg.StudyInstanceUID)
        deadline = time.monotonic() + 60
        while node.text().count("INFO done ") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node.text().count("INFO done ") == 2, node.text()
        again = orthanc.instances(rg.StudyInstanceUID)
        assert sorted(i["SOPInstanceUID"] for i in again) == sorted(
            i["SOPInstanceUID"] for i in stored
        )
    finally:
        code = node.stop()
    assert code == 0
    log = node.text()
    assert "SIGTERM: stopping" in log and "0 instance(s) left in the spool" in log
    assert "modality CT" in log
    rows = [json.loads(line) for line in (spool / "results.jsonl").read_text().splitlines()]
    # CR done twice; CT skipped twice; our own derived instance (in the study when it was
    # pushed again) skipped as outside the domain, never super-resolved a second time
    assert sorted(r["status"] for r in rows) == ["done", "done", "skipped", "skipped", "skipped"]
    assert sum("modality OT" in (r["error"] or "") for r in rows) == 1
    assert not list((spool / "incoming").iterdir())


def test_node_resumes_the_spool_of_a_killed_node(orthanc, server, study, tmp_path):
    """Instances acknowledged by a node that died before processing them are in its spool:
    the next node processes them at start, and only them (no duplicate in Orthanc). This
    node delivers over DICOMweb (STOW-RS, credentials from the environment)."""
    orthanc.clear()
    rg = pydicom.dcmread(study / "rg.dcm")
    orthanc.upload(study / "rg.dcm")
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    shutil.copy(study / "rg.dcm", spool / "incoming" / f"{rg.SOPInstanceUID}.dcm")
    broken = spool / "incoming" / "1.2.3.4.dcm"  # a truncated file: kept for the operator
    broken.write_bytes((study / "rg.dcm").read_bytes()[:1000])
    env = {**os.environ, ENV_USER: USER, ENV_PASSWORD: PASSWORD}
    node = Listener(spool, orthanc, server, dest=f"dicomweb:{orthanc.dicomweb_url}", env=env)
    try:
        stored = _wait_instances(orthanc, rg.StudyInstanceUID, 2)
        assert len(stored) == 2, node.text()
        _check_derived_in_orthanc(orthanc, server, rg, stored)
    finally:
        assert node.stop() == 0
    assert "resuming 2 spooled instance(s)" in node.text()
    assert PASSWORD not in node.text()
    assert not list((spool / "incoming").iterdir())
    assert (spool / "failed" / broken.name).is_file() and "kept 1.2.3.4.dcm" in node.text()


def test_node_keeps_the_spool_while_the_destination_is_down(orthanc, server, study, tmp_path):
    """Destination unreachable: the instance stays spooled (computed once, in the manifest);
    the next node, with the destination back, delivers it without computing it again."""
    orthanc.clear()
    rg = pydicom.dcmread(study / "rg.dcm")
    orthanc.upload(study / "rg.dcm")
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    spooled = spool / "incoming" / f"{rg.SOPInstanceUID}.dcm"
    shutil.copy(study / "rg.dcm", spooled)
    node = Listener(spool, orthanc, server, dest=f"dimse:ORTHANC@127.0.0.1:{free_port()}")
    try:
        node.wait_for("wait for the next try")
    finally:
        assert node.stop() == 0
    assert spooled.is_file() and "1 instance(s) left in the spool" in node.text()
    assert len(orthanc.instances(rg.StudyInstanceUID)) == 1

    node = Listener(spool, orthanc, server)
    try:
        stored = _wait_instances(orthanc, rg.StudyInstanceUID, 2)
        assert len(stored) == 2, node.text()
        node.wait_for("batch of 1")
    finally:
        assert node.stop() == 0
    assert "1 done (1 by an earlier run)" in node.text()  # delivered, not recomputed
    assert not spooled.exists()
