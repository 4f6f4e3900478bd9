"""client.batch on in-process fake servers (tests/fake_triton.py; bicubic "model"): spreading
over several URLs, resuming without redoing, retries on transient errors only, a server that
stays away, a changed model, the manifest and the report files.

The fake answers in milliseconds and fails on demand; what only the real tritonserver can
show (restart mid-run, kill -9 and resume) is in test_batch_faults.py.
"""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fake_triton import FakeTriton, model_config

from cxr_sr.client.batch import REPORT_CSV, REPORT_JSON, run_batch
from cxr_sr.client.exit_codes import EXIT_INPUT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from cxr_sr.client.io import read_image, write_png
from cxr_sr.client.manifest import MANIFEST
from cxr_sr.client.servers import backoff_s
from cxr_sr.client.triton import ModelIdentity
from cxr_sr.imaging import bicubic_baseline

FAST = {"progress": False, "backoff": 0.01, "log": lambda line: None}


def _inputs(folder: Path, n: int, side: int = 24) -> list[Path]:
    rng = np.random.default_rng(0)
    return [
        write_png(folder / f"img{i:02d}.png", rng.random((side, side + i)), bits=16)
        for i in range(n)
    ]


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*_sr.png")}


def test_batch_spreads_over_servers_and_a_rerun_redoes_nothing(tmp_path: Path) -> None:
    files = _inputs(tmp_path / "in", 8)
    out = tmp_path / "out"
    with FakeTriton(delay_s=0.05) as a, FakeTriton(delay_s=0.05) as b:
        report = run_batch([tmp_path / "in"], out, [a.url, b.url], concurrency=4, **FAST)
        assert report.exit_code == EXIT_OK and report.count("done") == 8
        assert len(a.requests) + len(b.requests) == 8
        assert len(a.requests) >= 2 and len(b.requests) >= 2  # both servers worked
        assert {r["server"] for r in report.rows} == {a.url, b.url}
        for f in files:  # each output is its own input's result (nothing mixed up)
            sr = read_image(out / f"{f.stem}_sr.png")
            np.testing.assert_allclose(
                sr, np.clip(bicubic_baseline(read_image(f)), 0, 1), atol=1e-4
            )
        before = _mtimes(out)

        again = run_batch([tmp_path / "in"], out, [a.url, b.url], concurrency=4, **FAST)
        assert again.exit_code == EXIT_OK and again.resumed == 8
        assert len(a.requests) + len(b.requests) == 8  # nothing sent again
        assert _mtimes(out) == before

        _inputs(tmp_path / "in", 10)  # two more inputs: only they are done
        more = run_batch([tmp_path / "in"], out, [a.url, b.url], concurrency=4, **FAST)
        assert more.count("done") == 10 and more.resumed == 8
        assert len(a.requests) + len(b.requests) == 10
    assert "8 by an earlier run" in more.summary() and "10 done" in more.summary()


def test_batch_retries_transient_errors_with_backoff(tmp_path: Path) -> None:
    _inputs(tmp_path / "in", 1)
    with FakeTriton(unavailable=2, resets=1) as f:
        report = run_batch([tmp_path / "in"], tmp_path / "out", [f.url], **FAST)
    assert report.exit_code == EXIT_OK
    assert [r["status"] for r in f.requests] == [503, 503, "reset", 200]
    (row,) = report.rows
    # the 503s are ours to retry; the reset geventhttpclient may retry on its own
    assert row["status"] == "done" and row["retries"] in (2, 3) and row["attempts"] == 1


def test_a_refused_request_is_never_retried(tmp_path: Path) -> None:
    _inputs(tmp_path / "in", 2)
    with FakeTriton() as f:
        report = run_batch(
            [tmp_path / "in"], tmp_path / "out", [f.url], sampling={"steps": 999}, **FAST
        )
    assert report.exit_code == EXIT_INPUT_FAILED and report.count("failed") == 2
    assert [r["status"] for r in f.requests] == [400, 400]  # one request per input
    assert all("exceeds the 300 timesteps" in r["error"] for r in report.rows)
    assert "2 failed" in report.summary()


def test_a_server_that_stays_away_stops_the_run_and_a_rerun_finishes(tmp_path: Path) -> None:
    _inputs(tmp_path / "in", 3)
    out = tmp_path / "out"
    with FakeTriton(unavailable=1000) as f:
        report = run_batch([tmp_path / "in"], out, [f.url], retries=2, **FAST)
        assert len(f.requests) == 3  # the first input: 1 + 2 retries, then the run stops
    assert report.exit_code == EXIT_UNREACHABLE
    assert [r["status"] for r in report.rows] == ["pending"] * 3
    assert "unavailable" in report.message.lower() and "re-run" in report.message
    with FakeTriton() as f:
        report = run_batch([tmp_path / "in"], out, [f.url], **FAST)
    assert report.exit_code == EXIT_OK and report.count("done") == 3 and report.resumed == 0


def test_an_unreachable_url_among_several_is_set_aside(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    _inputs(tmp_path / "in", 3)
    lines: list[str] = []
    with FakeTriton() as f:
        report = run_batch(
            [tmp_path / "in"], tmp_path / "out", [dead, f.url], concurrency=2,
            progress=False, backoff=0.01, log=lines.append,
        )  # fmt: skip
    assert report.exit_code == EXIT_OK and {r["server"] for r in report.rows} == {f.url}
    assert any(dead in line and "going on without it" in line for line in lines)
    with FakeTriton() as f:
        pass  # stopped: nothing answers
    only_dead = run_batch([tmp_path / "in"], tmp_path / "o2", [dead, f.url], retries=0, **FAST)
    assert only_dead.exit_code == EXIT_UNREACHABLE and not (tmp_path / "o2").exists()


def test_a_changed_model_is_refused_or_redone(tmp_path: Path) -> None:
    _inputs(tmp_path / "in", 2)
    out = tmp_path / "out"
    old = ModelIdentity("nih", "0.1.0", "a" * 64)
    new = ModelIdentity("nih", "0.2.0", "b" * 64)
    with FakeTriton(model_config(identity=old.parameters())) as f:
        first = run_batch([tmp_path / "in"], out, [f.url], **FAST)
    assert first.model == old and {r["weights_sha256"] for r in first.rows} == {"a" * 64}
    with FakeTriton(model_config(identity=new.parameters())) as f:
        refused = run_batch([tmp_path / "in"], out, [f.url], **FAST)
        assert refused.exit_code == EXIT_USAGE and not f.requests
        assert old.short() in refused.message and new.short() in refused.message
        assert "--on-change redo" in refused.message
        redone = run_batch([tmp_path / "in"], out, [f.url], on_change="redo", **FAST)
        assert len(f.requests) == 2
    assert redone.exit_code == EXIT_OK and {r["model_version"] for r in redone.rows} == {"0.2.0"}


def test_servers_of_different_models_are_refused(tmp_path: Path) -> None:
    _inputs(tmp_path / "in", 1)
    a = ModelIdentity("nih", "0.1.0", "a" * 64).parameters()
    b = ModelIdentity("nih", "0.1.0", "b" * 64).parameters()
    with FakeTriton(model_config(identity=a)) as fa, FakeTriton(model_config(identity=b)) as fb:
        report = run_batch([tmp_path / "in"], tmp_path / "out", [fa.url, fb.url], **FAST)
    assert report.exit_code == EXIT_USAGE and "different models" in report.message


def test_manifest_and_report_files(tmp_path: Path) -> None:
    _inputs(tmp_path / "in", 2)
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out = tmp_path / "out"
    identity = ModelIdentity("nih", "0.1.0", "c" * 64)
    with FakeTriton(model_config(identity=identity.parameters())) as f:
        report = run_batch([tmp_path / "in"], out, [f.url], sampling={"seed": 4}, **FAST)
    assert report.exit_code == EXIT_INPUT_FAILED
    db = sqlite3.connect(out / MANIFEST)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    states = dict(db.execute("SELECT key, state FROM jobs").fetchall())
    assert states == {"img00": "done", "img01": "done", "bad": "failed"}
    (outputs,) = db.execute("SELECT outputs FROM jobs WHERE key = 'img00'").fetchone()
    assert json.loads(outputs) == [str(out / "img00_sr.png")]
    db.close()
    with open(out / REPORT_CSV, newline="") as fh:
        rows = {r["key"]: r for r in csv.DictReader(fh)}
    assert rows["img00"]["status"] == "done" and rows["img00"]["out_size"] == "96x96"
    assert rows["img00"]["weights_sha256"] == "c" * 64 and rows["img00"]["model_version"] == "0.1.0"
    assert float(rows["img00"]["seconds"]) > 0 and rows["img00"]["server"] == f.url
    assert rows["bad"]["status"] == "failed" and "bad.png" in rows["bad"]["error"]
    assert {r["weights_sha256"] for r in rows.values()} == {"c" * 64}  # every row says the model
    data = json.loads((out / REPORT_JSON).read_text())
    assert data["summary"] == {"done": 2, "failed": 1, "skipped": 0, "pending": 0}
    assert data["model"]["weights_sha256"] == "c" * 64 and data["sampling"] == {"seed": 4}
    assert data["exit_code"] == EXIT_INPUT_FAILED


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    delays = [[backoff_s(k, 0.5, 8.0) for k in range(7)] for _ in range(50)]
    for k in range(5):
        assert all(0.5 * 0.5 * 2**k <= row[k] < 1.5 * 0.5 * 2**k for row in delays)
    assert all(row[6] < 1.5 * 8.0 for row in delays)
    assert len({row[2] for row in delays}) > 1  # jitter


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "bad"}, "mode"),
        ({"on_change": "maybe"}, "on_change"),
        ({"concurrency": 0}, "concurrency"),
        ({"dicom": True, "mode": "native"}, "upscale mode"),
        ({"png": False}, "nothing to write"),
    ],
)
def test_run_batch_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_batch([tmp_path], tmp_path / "out", **kwargs)


def test_one_run_per_output_folder(tmp_path: Path) -> None:
    import fcntl

    from cxr_sr.client.batch import LOCK

    _inputs(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    with FakeTriton() as f, open(out / LOCK, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as another run would
        busy = run_batch([tmp_path / "in"], out, [f.url], **FAST)
        assert busy.exit_code == EXIT_USAGE and "another cxr-sr run" in busy.message
        assert not f.requests
        fcntl.flock(held, fcntl.LOCK_UN)
        assert run_batch([tmp_path / "in"], out, [f.url], **FAST).exit_code == EXIT_OK


def test_a_server_back_with_another_model_stops_the_run(tmp_path: Path) -> None:
    _inputs(tmp_path / "in", 2)
    old = ModelIdentity("nih", "0.1.0", "a" * 64)
    new = ModelIdentity("nih", "0.1.0", "b" * 64)
    with FakeTriton(
        model_config(identity=old.parameters()),
        unavailable=1,
        config_after_503=model_config(identity=new.parameters()),
    ) as f:
        report = run_batch([tmp_path / "in"], tmp_path / "out", [f.url], **FAST)
    assert report.exit_code == EXIT_USAGE
    assert new.short() in report.message and "--on-change redo" in report.message
    assert [r["status"] for r in report.rows] == ["pending", "pending"]  # nothing mixed
    assert not list((tmp_path / "out").glob("*_sr.png"))
