"""The job manifest of a batch run: ``Manifest(<out>/cxr-sr-manifest.sqlite)``.

One SQLite file (WAL, ``synchronous=FULL``) in the output folder holds every input's row:
its key (the output stem relative to the folder), path, state (``PENDING``, ``RUNNING``,
``DONE``, ``FAILED``, ``SKIPPED``), outputs, error, attempts, timings, report row and the
identity of the model that made it, and the run's model identity and settings. It is what
lets ``client.batch.run_batch`` resume a killed run (done rows are not redone, rows left
running start again), notice a changed model or settings (``check_run``) and report every
input, this run's and earlier ones'. Used from one thread (the batch's scheduler).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cxr_sr.client.triton import ModelIdentity

MANIFEST = "cxr-sr-manifest.sqlite"
PENDING, RUNNING, DONE, FAILED, SKIPPED = "pending", "running", "done", "failed", "skipped"


class ManifestMismatchError(ValueError):
    """The manifest's results were made by another model or with other settings."""


class Manifest:
    """The job manifest: one SQLite file in the output folder (WAL), used from one thread.

    Table ``jobs``: key (output stem, primary key), path, state, outputs (JSON list), error,
    attempts, started / finished (Unix time), seconds, row (the report row, JSON), model
    identity. Table ``meta``: the run's model identity and settings.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a done row survives a crash
        self.db.execute("PRAGMA wal_autocheckpoint=64")  # keep the WAL file small
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS jobs (
                key TEXT PRIMARY KEY, path TEXT NOT NULL, state TEXT NOT NULL,
                outputs TEXT NOT NULL DEFAULT '[]', error TEXT, attempts INTEGER NOT NULL
                DEFAULT 0, started REAL, finished REAL, seconds REAL, row TEXT,
                model_name TEXT, model_version TEXT, weights_sha256 TEXT);
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            """
        )

    def close(self) -> None:
        self.db.close()

    def get_meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row["value"])

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (key, json.dumps(value, sort_keys=True)),
        )

    def check_run(
        self, model: ModelIdentity, settings: dict[str, Any], on_change: str
    ) -> str | None:
        """Compare the manifest's model and settings (``settings``: what the done rows depend
        on, JSON-able) with this run's; redo (``on_change="redo"``) or refuse
        (:class:`ManifestMismatchError`) a change, then record this run's. Returns a note
        when done rows were reset."""
        before_model, before_settings = self.get_meta("model"), self.get_meta("settings")
        now_settings = json.loads(json.dumps(settings, sort_keys=True))
        changes = []
        if before_model is not None and before_model != asdict(model):
            old = ModelIdentity(**before_model)
            changes.append(
                f"its results were made by model {old.short()}, the server now serves "
                f"{model.short()}"
            )
        if before_settings is not None and before_settings != now_settings:
            diff = sorted(k for k in now_settings if before_settings.get(k) != now_settings.get(k))
            changes.append(f"its settings differ ({', '.join(diff)})")
        note = None
        if changes and self.count(DONE) + self.count(SKIPPED):
            if on_change != "redo":
                raise ManifestMismatchError(
                    f"{self.path}: {'; '.join(changes)}. Re-run with --on-change redo to redo "
                    "them, or use another --out"
                )
            self.redo()
            note = f"redoing earlier results: {'; '.join(changes)}"
        self.set_meta("model", asdict(model))
        self.set_meta("settings", now_settings)
        return note

    def count(self, state: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (state,)).fetchone()[0]

    def sync(self, jobs: Sequence[tuple[str, Path]]) -> None:
        """Add new inputs as pending; a key now naming another file starts again; rows a
        killed run left running, failed rows (retried) and skipped ones (checked again: a
        re-run may add --force) are pending again."""
        with self.db:
            self.db.execute("BEGIN")
            for key, path in jobs:
                old = self.db.execute("SELECT path FROM jobs WHERE key = ?", (key,)).fetchone()
                if old is None:
                    self.db.execute(
                        "INSERT INTO jobs (key, path, state) VALUES (?, ?, ?)",
                        (key, str(path), PENDING),
                    )
                elif old["path"] != str(path):
                    self.db.execute(
                        "UPDATE jobs SET path = ?, state = ?, attempts = 0 WHERE key = ?",
                        (str(path), PENDING, key),
                    )
            self.db.execute(
                "UPDATE jobs SET state = ? WHERE state IN (?, ?, ?)",
                (PENDING, RUNNING, FAILED, SKIPPED),
            )

    def redo(self) -> None:
        """Every done or skipped row pending again (the model or the settings changed)."""
        self.db.execute("UPDATE jobs SET state = ? WHERE state IN (?, ?)", (PENDING, DONE, SKIPPED))

    def state(self, key: str) -> str:
        return self.db.execute("SELECT state FROM jobs WHERE key = ?", (key,)).fetchone()["state"]

    def start(self, key: str) -> None:
        self.db.execute(
            "UPDATE jobs SET state = ?, started = ?, attempts = attempts + 1 WHERE key = ?",
            (RUNNING, time.time(), key),
        )

    def finish(
        self,
        key: str,
        state: str,
        *,
        outputs: Sequence[str] = (),
        error: str | None = None,
        row: dict[str, Any] | None = None,
        model: ModelIdentity | None = None,
    ) -> None:
        ident = asdict(model) if model else {"name": None, "version": None, "weights_sha256": None}
        self.db.execute(
            "UPDATE jobs SET state = ?, outputs = ?, error = ?, finished = ?, "
            "seconds = ? - started, row = ?, model_name = ?, model_version = ?, "
            "weights_sha256 = ? WHERE key = ?",
            (
                state,
                json.dumps(list(outputs)),
                error,
                time.time(),
                time.time(),
                json.dumps(row) if row is not None else None,
                ident["name"],
                ident["version"],
                ident["weights_sha256"],
                key,
            ),
        )

    def release(self, key: str) -> None:
        """A row whose work was interrupted (disk full, server gone): pending again."""
        self.db.execute("UPDATE jobs SET state = ? WHERE key = ?", (PENDING, key))

    def rows(self, keys: Iterable[str]) -> list[dict[str, Any]]:
        out = []
        for key in keys:
            r = self.db.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone()
            if r is not None:
                out.append(dict(r))
        return out
