"""DICOMweb (client.pacs) and ``cxr-sr pacs``: credentials, errors, and a real Orthanc round
trip (QIDO-RS find, WADO-RS retrieve, super-resolve on the real tritonserver, STOW-RS back)."""

from __future__ import annotations

import base64
import json
import logging
import os
from pathlib import Path

import pydicom
import pytest
import requests
from orthanc import PASSWORD, USER, assert_derived, ct_slice, expected_derived, small_radiograph

from cxr_sr.builders.serve import free_port
from cxr_sr.client import pacs_cli
from cxr_sr.client.exit_codes import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from cxr_sr.client.pacs import (
    ENV_CREDENTIALS_FILE,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    Credentials,
    DicomWebPacs,
    PacsAccessError,
    credentials_from_env,
    study_filters,
)
from cxr_sr.client.studies import parse_destination, submit_study
from cxr_sr.client.triton import SRClient

SAMPLING = ["--steps", "1", "--seed", "0"]


@pytest.fixture(autouse=True)
def _no_pacs_env(monkeypatch):
    for name in (ENV_USER, ENV_PASSWORD, ENV_TOKEN, ENV_CREDENTIALS_FILE):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small CR chest radiograph (97x92) and a CT slice of the same study, as files."""
    folder = tmp_path_factory.mktemp("study")
    rg = small_radiograph(folder / "rg.dcm")
    ct = ct_slice(folder / "ct.dcm", rg)
    return folder, pydicom.dcmread(rg), pydicom.dcmread(ct)


# credentials


def test_credentials_from_env_basic_token_and_file(tmp_path):
    assert credentials_from_env(environ={}) is None
    basic = credentials_from_env(environ={ENV_USER: "u", ENV_PASSWORD: "pw-123"})
    assert (basic.username, basic.password) == ("u", "pw-123")
    assert "pw-123" not in repr(basic)
    token = credentials_from_env(environ={ENV_TOKEN: "tok-456"})
    assert token.token == "tok-456" and "tok-456" not in repr(token)
    with pytest.raises(ValueError, match=ENV_PASSWORD):
        credentials_from_env(environ={ENV_USER: "u"})

    f = tmp_path / "creds.json"
    f.write_text(json.dumps({"username": "f", "password": "pw-file"}))
    f.chmod(0o600)
    for got in (
        credentials_from_env(f, environ={}),
        credentials_from_env(environ={ENV_CREDENTIALS_FILE: str(f)}),
    ):
        assert (got.username, got.password) == ("f", "pw-file")
    f.write_text('{"username": "f", "password": "pw-file", "extra": 1}')
    with pytest.raises(ValueError, match="unknown keys extra"):
        credentials_from_env(f, environ={})
    f.write_text("password: pw-file")
    with pytest.raises(ValueError, match="not JSON") as e:
        credentials_from_env(f, environ={})
    assert "pw-file" not in str(e.value)
    with pytest.raises(ValueError, match="not both"):
        Credentials("u", "p", "t")


def test_group_readable_credentials_file_warns(tmp_path, caplog):
    f = tmp_path / "creds.json"
    f.write_text(json.dumps({"token": "tok"}))
    f.chmod(0o644)
    assert credentials_from_env(f, environ={}).token == "tok"
    assert "readable by other users" in caplog.text


def test_bearer_token_is_set_per_request_and_never_shown():
    pacs = DicomWebPacs("http://127.0.0.1:1/dicom-web", Credentials(token="tok-789"))
    request = requests.Request("GET", "http://127.0.0.1:1/dicom-web/studies").prepare()
    assert pacs._session.auth(request).headers["Authorization"] == "Bearer tok-789"
    assert "tok-789" not in repr(pacs) and "tok-789" not in repr(pacs._session.auth)
    assert "bearer token" in repr(pacs)


def test_parse_destination():
    dimse = parse_destination("dimse:PACS@10.0.0.5:104", calling_ae="ME")
    assert str(dimse) == "dimse:PACS@10.0.0.5:104" and dimse.calling_ae == "ME"
    web = parse_destination("dicomweb:https://pacs/dicom-web", credentials=Credentials("u", "p"))
    assert str(web) == "dicomweb:https://pacs/dicom-web" and "p" not in repr(web.pacs)[-12:]
    assert str(parse_destination("http://pacs/dicom-web")) == "dicomweb:http://pacs/dicom-web"
    assert str(parse_destination("folder:out/x")) == "folder:out/x"
    for bad in ("PACS@h:1", "dimse:PACS", "folder:", "s3://bucket"):
        with pytest.raises(ValueError):
            parse_destination(bad)


def test_url_with_credentials_is_refused():
    with pytest.raises(ValueError, match="must not carry credentials"):
        DicomWebPacs("http://u:secret@127.0.0.1:8042/dicom-web")
    with pytest.raises(ValueError, match="http"):
        DicomWebPacs("127.0.0.1:8042/dicom-web")


def test_study_filters():
    assert study_filters(patient_id="P1", modality="cr") == {
        "PatientID": "P1",
        "ModalitiesInStudy": "CR",
    }
    assert study_filters(date_from="2024-01-02")["StudyDate"] == "20240102-"
    assert study_filters(date_to="20240105")["StudyDate"] == "-20240105"
    assert study_filters(date_from="20240105", date_to="20240105")["StudyDate"] == "20240105"
    with pytest.raises(ValueError, match="empty"):
        study_filters(date_from="20240106", date_to="20240105")
    with pytest.raises(ValueError, match="YYYYMMDD"):
        study_filters(date_from="Jan 5")


# unreachable PACS: exit code 3 and one line


def test_unreachable_dicomweb_exits_3_with_one_line(capsys):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert pacs_cli.main(["pacs", "find", "--dicomweb", url]) == EXIT_UNREACHABLE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no answer" in err[0] and url in err[0]


def test_run_usage_errors_exit_2(capsys):
    assert pacs_cli.main(["pacs", "run", "--url", "127.0.0.1:1"]) == EXIT_USAGE
    assert "--dicomweb" in capsys.readouterr().err
    code = pacs_cli.main(["pacs", "run", "--input", ".", "--dest", "ftp:x", "--url", "x:1"])
    assert code == EXIT_USAGE
    assert "expected dimse:AET@HOST:PORT" in capsys.readouterr().err


# against a real Orthanc


@pytest.mark.integration
def test_find_studies_by_criteria(orthanc, study):
    orthanc.clear()
    folder, rg, ct = study
    for f in ("rg.dcm", "ct.dcm"):
        orthanc.upload(folder / f)
    with DicomWebPacs(orthanc.dicomweb_url, Credentials(USER, PASSWORD)) as pacs:
        (found,) = pacs.find_studies(patient_id=rg.PatientID)
        assert found.study_uid == rg.StudyInstanceUID
        assert set(found.modalities) == {"CR", "CT"} and found.instances == 2
        assert pacs.find_studies(study_uid=rg.StudyInstanceUID, modality="CR")
        assert pacs.find_studies(modality="MR") == []
        assert pacs.find_studies(date_from="2004-08-26", date_to="2004-08-26")
        assert pacs.find_studies(date_from="20050101") == []
        assert pacs.find_studies(patient_id="someone else") == []
    with pytest.raises(PacsAccessError, match="401 authentication refused"):
        DicomWebPacs(orthanc.dicomweb_url, Credentials(USER, "wrong")).ping()


@pytest.mark.integration
def test_dicomweb_round_trip(orthanc, server, study, tmp_path, monkeypatch, capsys, caplog):
    """QIDO -> WADO -> upscale (real tritonserver) -> STOW, then read back from Orthanc: the
    CR is derived (same study, new series, reference, 4x, spacing / 4, the pixels
    SRClient.upscale gives), the CT skipped with its reason; a re-run replaces, never
    duplicates; the password appears nowhere."""
    orthanc.clear()
    folder, rg, ct = study
    for f in ("rg.dcm", "ct.dcm"):
        orthanc.upload(folder / f)
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    caplog.set_level(logging.DEBUG)
    report = tmp_path / "report.json"
    argv = [
        "pacs", "run", "--dicomweb", orthanc.dicomweb_url, "--study-uid", rg.StudyInstanceUID,
        "--url", server.http_url, *SAMPLING, "--json", str(report), "--quiet",
        "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    assert pacs_cli.main(argv) == EXIT_OK
    out = capsys.readouterr()

    data = json.loads(report.read_text())
    (study_report,) = data["studies"]
    rows = {Path(r["input"]).stem: r for r in study_report["rows"]}
    assert study_report["summary"] == {"done": 1, "failed": 0, "skipped": 1, "pending": 0}
    cr, ct_row = rows[rg.SOPInstanceUID], rows[ct.SOPInstanceUID]
    assert cr["status"] == "done" and cr["out_size"] == "388x368"
    assert cr["delivered_to"] == [f"dicomweb:{orthanc.dicomweb_url}"]
    assert cr["weights_sha256"] and cr["model_version"]
    assert ct_row["status"] == "skipped" and "modality CT" in ct_row["error"]
    assert "skipped" in out.err and "modality CT" in out.err

    stored = orthanc.instances(rg.StudyInstanceUID)
    assert len(stored) == 3  # CR, CT and the one derived instance
    (derived_uid,) = {i["SOPInstanceUID"] for i in stored} - {rg.SOPInstanceUID, ct.SOPInstanceUID}
    derived = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(derived_uid)))
    with SRClient(server.http_url) as client:
        expected = expected_derived(client, rg, steps=1, seed=0)
    assert_derived(derived, rg, expected)

    # a re-run replaces the derived instance: same UIDs, no duplicate
    assert pacs_cli.main(argv) == EXIT_OK
    out2 = capsys.readouterr()
    again = orthanc.instances(rg.StudyInstanceUID)
    assert sorted(i["SOPInstanceUID"] for i in again) == sorted(i["SOPInstanceUID"] for i in stored)

    basic = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    files = [report, *(tmp_path / "run").rglob("report.*"), *(tmp_path / "run").rglob("*.sqlite")]
    texts = [out.out, out.err, out2.out, out2.err, caplog.text]
    texts += [f.read_bytes().decode("latin-1") for f in files]
    assert len(files) == 4
    for text in texts:
        assert PASSWORD not in text and basic not in text
    assert PASSWORD not in " ".join(argv)


@pytest.mark.integration
def test_wrong_password_exits_3_without_showing_it(orthanc, tmp_path, capsys):
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"username": USER, "password": "not-the-password-77"}))
    os.chmod(creds, 0o600)
    argv = ["pacs", "find", "--dicomweb", orthanc.dicomweb_url, "--credentials-file", str(creds)]
    assert pacs_cli.main(argv) == EXIT_UNREACHABLE
    err = capsys.readouterr().err
    assert "authentication refused" in err and "not-the-password-77" not in err


@pytest.mark.integration
def test_unreachable_triton_exits_3(orthanc, study, capsys, monkeypatch):
    orthanc.clear()
    folder, rg, _ = study
    orthanc.upload(folder / "rg.dcm")
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    argv = ["pacs", "run", "--dicomweb", orthanc.dicomweb_url, "--study-uid",
            rg.StudyInstanceUID, "--url", f"127.0.0.1:{free_port()}", "--quiet"]  # fmt: skip
    assert pacs_cli.main(argv) == EXIT_UNREACHABLE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "127.0.0.1" in err[0]


@pytest.mark.integration
def test_submit_study_python_api(orthanc, server, study, tmp_path, monkeypatch):
    """``submit_study(uid, pacs=URL)``: WADO-RS in, STOW-RS back and a folder copy; the
    report names each instance's outcome and the model."""
    orthanc.clear()
    folder, rg, ct = study
    for f in ("rg.dcm", "ct.dcm"):
        orthanc.upload(folder / f)
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    copies = tmp_path / "copies"
    report = submit_study(
        rg.StudyInstanceUID,
        url=server.http_url,
        pacs=orthanc.dicomweb_url,
        dest=[f"folder:{copies}"],
        out=tmp_path / "run",
        steps=1,
        seed=0,
    )
    assert report.exit_code == EXIT_OK, report.message
    assert (report.count("done"), report.count("skipped"), report.count("failed")) == (1, 1, 0)
    (row,) = report.done
    assert row["delivered_to"] == [f"dicomweb:{orthanc.dicomweb_url}", f"folder:{copies}"]
    (copy,) = copies.rglob("*.dcm")
    derived = pydicom.dcmread(copy)
    assert copy.parent.name == rg.StudyInstanceUID and copy.name == f"{derived.SOPInstanceUID}.dcm"
    assert derived.SOPInstanceUID in {
        i["SOPInstanceUID"] for i in orthanc.instances(rg.StudyInstanceUID)
    }
    with pytest.raises(ValueError, match="not a Study Instance UID"):
        submit_study("no/such/path", url=server.http_url, pacs=orthanc.dicomweb_url)
