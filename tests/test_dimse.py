"""DIMSE (client.dimse): AE titles and peers, the spooling C-STORE SCP, C-ECHO / C-STORE to a
real Orthanc, and ``cxr-sr pacs run --dest dimse:...`` on the real tritonserver."""

from __future__ import annotations

import json
import queue

import pydicom
import pytest
from orthanc import assert_derived, ct_slice, expected_derived, small_radiograph

from cxr_sr.builders.serve import free_port
from cxr_sr.client import pacs_cli
from cxr_sr.client.dimse import Peer, StoreSCP, check_ae_title, echo, send, spool_name
from cxr_sr.client.exit_codes import EXIT_OK, EXIT_UNREACHABLE
from cxr_sr.client.pacs import PacsUnreachableError
from cxr_sr.client.triton import SRClient


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    rg = small_radiograph(folder / "rg.dcm")
    ct_slice(folder / "ct.dcm", rg)
    return folder


def test_peer_and_ae_title_parsing():
    assert Peer.parse("ORTHANC@127.0.0.1:4242") == Peer("ORTHANC", "127.0.0.1", 4242)
    assert str(Peer.parse("A B@host:104")) == "A B@host:104"
    for bad in ("ORTHANC@127.0.0.1", "127.0.0.1:4242", "X@h:port", "@h:1"):
        with pytest.raises(ValueError, match="AET@HOST:PORT"):
            Peer.parse(bad)
    for bad in ("", "x" * 17, "A\\B", "   ", "é"):
        with pytest.raises(ValueError, match="AE title"):
            check_ae_title(bad)
    with pytest.raises(ValueError, match="port"):
        Peer("A", "h", 70000)


def test_spool_names_never_come_from_raw_uids():
    assert spool_name("1.2.840.10008.1") == "1.2.840.10008.1.dcm"
    for hostile in ("../../etc/passwd", "1.2/../../x", "a" * 80, ""):
        name = spool_name(hostile)
        assert "/" not in name and ".." not in name and name.startswith("x") and len(name) == 45


def test_scp_spools_before_success_and_checks_titles(study, tmp_path):
    """Our SCU sends to our SCP: the file is whole on disk when on_stored runs (before the
    Success answer), wrong called AE titles and calling AEs not allowed are refused."""
    seen = queue.Queue()

    def on_stored(item):
        # runs before the sender gets Success: the spooled file must already be complete
        ds = pydicom.dcmread(item.path)
        seen.put((item, ds.SOPInstanceUID, ds.pixel_array.shape))

    ds = pydicom.dcmread(study / "rg.dcm")
    with StoreSCP(tmp_path / "spool", port=0, on_stored=on_stored, allowed_aes=["SENDER"]) as scp:
        me = Peer("CXRSR", "127.0.0.1", scp.port)
        echo(me, calling_ae="SENDER")
        assert send([ds], me, calling_ae="SENDER") == 1
        item, uid, shape = seen.get(timeout=5)
        assert uid == ds.SOPInstanceUID and shape == (ds.Rows, ds.Columns)
        assert item.calling_ae == "SENDER" and item.path.name == f"{uid}.dcm"
        assert not list(item.path.parent.glob(".*part"))  # no temporary file left
        with pytest.raises(PacsUnreachableError, match="rejected"):
            echo(Peer("OTHER", "127.0.0.1", scp.port), calling_ae="SENDER")
        with pytest.raises(PacsUnreachableError, match="rejected"):
            echo(me, calling_ae="STRANGER")
    with pytest.raises(PacsUnreachableError, match="no answer"):
        echo(Peer("CXRSR", "127.0.0.1", free_port()))


def test_echo_and_send_commands_exit_codes(capsys):
    port = free_port()
    assert pacs_cli.main(["pacs", "echo", "--dimse", f"PACS@127.0.0.1:{port}"]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"PACS@127.0.0.1:{port}" in err[0] and "no answer" in err[0]


@pytest.mark.integration
def test_cstore_round_trip(orthanc, server, study, tmp_path, capsys):
    """``pacs run --input study --dest dimse:ORTHANC@...``: the derived CR arrives in Orthanc
    over C-STORE (references, UIDs, geometry, pixels), the CT is skipped; a re-run resumes
    from the manifest and re-sends the same instance, which replaces itself."""
    orthanc.clear()
    rg = pydicom.dcmread(study / "rg.dcm")
    orthanc.upload(study / "rg.dcm")
    pacs = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    assert pacs_cli.main(["pacs", "echo", "--dimse", pacs]) == EXIT_OK
    out = tmp_path / "run"
    argv = ["pacs", "run", "--input", str(study), "--dest", f"dimse:{pacs}", "--out", str(out),
            "--url", server.http_url, "--steps", "1", "--seed", "0", "--quiet"]  # fmt: skip
    assert pacs_cli.main(argv) == EXIT_OK
    err = capsys.readouterr().err
    assert "1 done" in err and "1 skipped" in err and "modality CT" in err

    stored = orthanc.instances(rg.StudyInstanceUID)
    assert len(stored) == 2  # the source CR and its derived instance
    (derived_uid,) = {i["SOPInstanceUID"] for i in stored} - {rg.SOPInstanceUID}
    derived = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(derived_uid)))
    with SRClient(server.http_url) as client:
        assert_derived(derived, rg, expected_derived(client, rg, steps=1, seed=0))
    report = json.loads((out / "report.json").read_text())
    (row,) = [r for r in report["rows"] if r["status"] == "done"]
    assert row["delivered_to"] == [f"dimse:{pacs}"]

    assert pacs_cli.main(argv) == EXIT_OK
    assert "(1 by an earlier run)" in capsys.readouterr().err  # resumed, not recomputed
    again = orthanc.instances(rg.StudyInstanceUID)
    assert sorted(i["SOPInstanceUID"] for i in again) == sorted(i["SOPInstanceUID"] for i in stored)


@pytest.mark.integration
def test_send_command_stores_files(orthanc, study, capsys):
    orthanc.clear()
    pacs = f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"
    assert pacs_cli.main(["pacs", "send", str(study), "--dimse", pacs]) == EXIT_OK
    assert "2 instance(s) stored" in capsys.readouterr().out
    rg = pydicom.dcmread(study / "rg.dcm", stop_before_pixels=True)
    assert len(orthanc.instances(rg.StudyInstanceUID)) == 2


@pytest.mark.integration
def test_unreachable_destination_exits_3_with_one_line(server, study, tmp_path, capsys):
    dead = f"dimse:PACS@127.0.0.1:{free_port()}"
    argv = ["pacs", "run", "--input", str(study / "rg.dcm"), "--dest", dead, "--quiet",
            "--out", str(tmp_path / "run"), "--url", server.http_url, "--steps", "1"]  # fmt: skip
    assert pacs_cli.main(argv) == EXIT_UNREACHABLE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PACS@127.0.0.1" in err[0] and "no answer" in err[0], err


def test_listen_without_a_server_exits_3(tmp_path, capsys):
    argv = ["listen", "--spool", str(tmp_path / "spool"), "--dest", f"folder:{tmp_path}",
            "--port", "0", "--url", f"127.0.0.1:{free_port()}"]  # fmt: skip
    assert pacs_cli.main(argv) == EXIT_UNREACHABLE
    assert "127.0.0.1" in capsys.readouterr().err
