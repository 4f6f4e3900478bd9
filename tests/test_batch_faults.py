"""Faults during a batch run: the client killed with SIGKILL and run again, the server
restarted mid-run (killed, as a crash, and started again), the output disk full. Nothing is
lost or duplicated, and every input is done exactly once.

- kill -9: the real ``cxr-sr`` in a subprocess against ``conftest.server``, killed once some
  derived DICOM instances are written; the same command again finishes the job, leaves the
  finished outputs untouched, and every derived UID is the deterministic one;
- server restart: our own tritonserver on the tiny repository, stopped and started again on
  the same ports while a run is going; the run waits it out (retries with backoff);
- disk full: RLIMIT_FSIZE in a subprocess makes writes past a size fail with EFBIG (the
  errno of a file-size limit, handled like ENOSPC and EDQUOT; SIGXFSZ ignored), which works
  without privileges, unlike a small tmpfs. The server there is the in-process fake
  (tests/fake_triton.py): its bicubic output of noise has a known size, so exactly one
  output is too big; the fault is the client's.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fake_triton import FakeTriton, model_config
from pydicom.uid import generate_uid
from test_dicom_derived import rg1_small

from cxr_sr.client.batch import run_batch
from cxr_sr.client.dicom import derived_uids
from cxr_sr.client.exit_codes import EXIT_INPUT_FAILED, EXIT_OK
from cxr_sr.client.io import write_png
from cxr_sr.client.manifest import MANIFEST
from cxr_sr.client.triton import SRClient

CLI = [sys.executable, "-m", "cxr_sr.client.cli"]


def _states(out: Path) -> dict[str, tuple[str, int]]:
    db = sqlite3.connect(out / MANIFEST)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {k: (s, a) for k, s, a in db.execute("SELECT key, state, attempts FROM jobs")}
    finally:
        db.close()


def _stamps(out: Path, pattern: str) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob(pattern)}


def _study(folder: Path, n: int) -> list[pydicom.Dataset]:
    """``n`` small CR instances (49x47) of one series, as DICOM files in ``folder``."""
    folder.mkdir(parents=True)
    base = rg1_small(40)
    sources = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.save_as(folder / f"im{i:02d}.dcm", enforce_file_format=True)
        sources.append(ds)
    return sources


def test_kill_9_then_resume_does_every_input_exactly_once(server, tmp_path: Path) -> None:
    sources = _study(tmp_path / "study", 8)
    out = tmp_path / "out"
    cmd = [*CLI, "upscale", str(tmp_path / "study"), "--out", str(out), "--url",
           server.http_url, "--dicom", "--seed", "1", "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _done_count(out) < 2 and proc.poll() is None:  # rows marked done, not files
            assert time.monotonic() < deadline, "no output within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = _states(out)
    done_before = {k for k, (s, _) in before.items() if s == "done"}
    assert 2 <= len(done_before) < 8
    kept = {name: stamp for name, stamp in _stamps(out, "*_sr.*").items()
            if name.split("_sr.")[0] in done_before}  # fmt: skip

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == EXIT_OK, again.stderr
    assert f"({len(done_before)} by an earlier run)" in again.stderr
    after = _states(out)
    assert {s for s, _ in after.values()} == {"done"} and len(after) == 8
    for key in done_before:  # finished work was not redone
        assert after[key][1] == 1
    assert {n: s for n, s in _stamps(out, "*_sr.*").items() if n in kept} == kept
    assert sorted(p.name for p in out.glob("*_sr.dcm")) == [f"im{i:02d}_sr.dcm" for i in range(8)]
    assert not [p for p in out.rglob(".*") if p.is_file() and ".partial-" in p.name]
    with SRClient(server.http_url) as c:
        identity = c.model_identity()
    for i, source in enumerate(sources):
        derived = pydicom.dcmread(out / f"im{i:02d}_sr.dcm")
        assert (derived.SeriesInstanceUID, derived.SOPInstanceUID) == derived_uids(source, identity)
        assert (derived.Rows, derived.Columns) == (196, 188)
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows)


def _done_count(out: Path) -> int:
    """Rows the manifest holds as done (0 before it exists); read while the run writes."""
    if not (out / MANIFEST).is_file():  # sqlite3.connect would create it
        return 0
    try:
        return sum(state == "done" for state, _ in _states(out).values())
    except Exception:  # noqa: BLE001 - not created yet, or caught mid-transaction
        return 0


@pytest.mark.integration
def test_server_restarted_mid_run(built_repository, tmp_path: Path) -> None:
    from cxr_sr.builders.serve import TritonServer

    repo, _ = built_repository
    rng = np.random.default_rng(5)
    n = 24
    for i in range(n):
        write_png(tmp_path / "in" / f"im{i:02d}.png", rng.random((64, 64)), bits=16)
    out = tmp_path / "out"
    first = TritonServer(repo, log_file=tmp_path / "triton1.log").start()
    ports = {"http_port": first.http_port, "grpc_port": first.grpc_port,
             "metrics_port": first.metrics_port}  # fmt: skip
    result: dict = {}

    def run() -> None:
        result["report"] = run_batch(
            [tmp_path / "in"], out, [first.http_url], concurrency=2, progress=False,
            sampling={"seed": 2}, log=lambda line: None,
        )  # fmt: skip

    second = None
    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*_sr.png"))) < 2:
            assert time.monotonic() < deadline and thread.is_alive(), "the run made no output"
            time.sleep(0.05)
        first.stop(timeout_s=0)  # as a crash: in-flight requests are cut off
        assert thread.is_alive(), "the run ended with the server"
        time.sleep(1.0)  # requests now meet a closed port
        second = TritonServer(repo, log_file=tmp_path / "triton2.log", **ports).start()
        thread.join(240)
        assert not thread.is_alive(), "the run did not finish after the restart"
    finally:
        first.stop()
        if second is not None:
            second.stop()
        thread.join(60)
    report = result["report"]
    assert report.exit_code == EXIT_OK, report.summary()
    assert report.count("done") == n
    assert sum(r["retries"] for r in report.rows) >= 1  # some request met the restart
    assert sorted(p.name for p in out.glob("*_sr.png")) == [f"im{i:02d}_sr.png" for i in range(n)]
    assert {a for _, a in _states(out).values()} == {1}  # each input done once


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead

    return apply


def test_disk_full_stops_cleanly_and_a_rerun_finishes(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    for i in range(3):
        write_png(tmp_path / "in" / f"a{i}.png", rng.random((16, 16)), bits=8)
    write_png(tmp_path / "in" / "b_big.png", rng.random((128, 128)), bits=16)  # ~0.5 MB out
    for i in range(2):
        write_png(tmp_path / "in" / f"c{i}.png", rng.random((16, 16)), bits=8)
    out = tmp_path / "out"
    with FakeTriton(model_config(16, 128)) as fake:
        cmd = [*CLI, str(tmp_path / "in"), "--out", str(out), "--url", fake.url, "--quiet"]
        full = subprocess.run(
            cmd, capture_output=True, text=True, timeout=120,
            preexec_fn=_limit_file_size(256 * 1024),
        )  # fmt: skip
        assert full.returncode == EXIT_INPUT_FAILED, full.stderr
        assert "Traceback" not in full.stderr
        stop_lines = [line for line in full.stderr.splitlines() if "disk full" in line]
        assert stop_lines and "re-run the same command" in stop_lines[0]
        states = _states(out)  # the manifest is intact and says what is left
        assert states == {
            "a0": ("done", 1), "a1": ("done", 1), "a2": ("done", 1),
            "b_big": ("pending", 1), "c0": ("pending", 0), "c1": ("pending", 0),
        }  # fmt: skip
        assert not (out / "b_big_sr.png").exists()
        assert not [p for p in out.rglob(".*") if ".partial-" in p.name]
        kept = _stamps(out, "a*_sr.png")

        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert again.returncode == EXIT_OK, again.stderr
    assert {s for s, _ in _states(out).values()} == {"done"}
    assert _stamps(out, "a*_sr.png") == kept  # not redone
    assert (out / "b_big_sr.png").stat().st_size > 256 * 1024
    assert len(list(out.glob("*_sr.png"))) == 6
    assert os.path.getsize(out / "report.csv") > 0
