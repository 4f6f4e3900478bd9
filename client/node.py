"""DICOM node mode: receive studies over C-STORE, super-resolve them, send the derived series
on, the way AI nodes are wired into a hospital's DICOM network.

    node = Node("/var/spool/cxr-sr", parse_destination("dimse:PACS@pacs:104"),
                url="127.0.0.1:8000", port=11112)
    node.run(stop_event)        # until stop_event is set (``cxr-sr listen`` sets it on SIGTERM)

How an instance travels (and why nothing is lost when the node dies):

1. the C-STORE SCP (``client.dimse.StoreSCP``) writes it to ``<spool>/incoming/`` durably
   and only then answers Success to the sender;
2. the node takes what has arrived (up to ``batch`` instances) through the batch engine
   (``client.batch.run_batch`` with the spool's ``work`` folder as its folder: job manifest,
   ``workers`` images in flight, retries with backoff, report), which skips inputs outside
   the model's domain with their reason (unless ``force``) and writes each derived instance;
3. each derived instance is delivered to the destination (``client.studies.deliver``);
4. each outcome is appended to ``<spool>/results.jsonl`` (the batch report's row plus
   ``delivered_to``), then the spooled file is deleted (done, skipped) or moved to
   ``<spool>/failed/`` (kept for the operator);
5. while the Triton server or the destination is unreachable, the instances stay in
   ``incoming/`` and the node tries again after a backoff (1 s doubling to 60 s).

So ``incoming/`` is the durable queue and the manifest remembers what was already computed:
a node that was stopped (SIGTERM/SIGINT: it stops accepting, finishes the batch in hand and
exits) or killed resumes every instance still spooled when it starts again, without
recomputing the finished ones; a re-delivered instance has the same derived UIDs, so it
replaces its earlier copy at the destination instead of duplicating it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from cxr_sr.client.batch import run_batch
from cxr_sr.client.dimse import DEFAULT_AE_TITLE, Received, StoreSCP
from cxr_sr.client.exit_codes import EXIT_UNREACHABLE
from cxr_sr.client.manifest import DONE, FAILED, MANIFEST, SKIPPED, Manifest
from cxr_sr.client.studies import Destination, deliver, derived_file

log = logging.getLogger(__name__)

BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 60.0
DEFAULT_BATCH = 8


class Node:
    """A C-STORE SCP feeding the batch engine, then a destination.

    Args:
        spool: the node's folder (``incoming/``, ``work/``, ``failed/``, ``results.jsonl``).
        destination: where derived instances go (``client.studies.parse_destination``).
        url, protocol, model, timeout_s: the Triton server.
        ae_title, host, port, allowed_aes: the SCP's (``client.dimse.StoreSCP``).
        workers: images in flight at once (``run_batch``'s concurrency).
        batch: most instances taken into one batch run (bounds the time a stop waits for).
        force: process inputs outside the model's domain instead of skipping them.
        sampling: request-schema keywords for every request (``steps``, ``seed``, ...).
    """

    def __init__(
        self,
        spool: str | os.PathLike,
        destination: Destination,
        *,
        url: str = "127.0.0.1:8000",
        protocol: str = "http",
        model: str = "cxr_sr",
        timeout_s: float = 300.0,
        ae_title: str = DEFAULT_AE_TITLE,
        host: str = "127.0.0.1",
        port: int = 11112,
        allowed_aes: tuple[str, ...] = (),
        workers: int = 1,
        batch: int = DEFAULT_BATCH,
        force: bool = False,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        if workers < 1 or batch < 1:
            raise ValueError(f"workers and batch must be >= 1, got {workers} and {batch}")
        self.spool = Path(spool)
        self.incoming = self.spool / "incoming"
        self.work = self.spool / "work"
        self.failed_dir = self.spool / "failed"
        self.results = self.spool / "results.jsonl"
        self.destination = destination
        self.batch_args = dict(
            urls=[url], protocol=protocol, model=model, timeout_s=timeout_s,
            concurrency=workers, png=False, dicom=True, force=force, on_change="redo",
            sampling=dict(sampling or {}), progress=False, log=self._say,
        )  # fmt: skip
        self.batch = batch
        self.scp = StoreSCP(
            self.incoming,
            ae_title=ae_title,
            host=host,
            port=port,
            on_stored=self._received,
            allowed_aes=allowed_aes,
        )
        self._arrived = threading.Event()
        self._stop = threading.Event()

    @staticmethod
    def _say(line: str) -> None:
        log.info("%s", line)

    def _received(self, item: Received) -> None:
        self._arrived.set()

    def pending(self) -> list[Path]:
        """Spooled instances not yet finished, oldest first."""
        if not self.incoming.is_dir():
            return []
        files = [p for p in self.incoming.glob("*.dcm") if p.is_file()]
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def run(self, stop: threading.Event | None = None, ready=None) -> None:
        """Resume the spool, listen, and process until ``stop`` is set; then stop accepting,
        finish the batch in hand and return (what is left stays spooled). ``ready(node)``
        is called once the SCP listens."""
        self._stop = stop or threading.Event()
        for folder in (self.incoming, self.work, self.failed_dir):
            folder.mkdir(parents=True, exist_ok=True)
        resumed = len(self.pending())
        if resumed:
            log.info("resuming %d spooled instance(s)", resumed)
        self.scp.start()
        try:
            if ready is not None:
                ready(self)
            delay = BACKOFF_START_S
            while not self._stop.is_set():
                todo = self.pending()[: self.batch]
                if not todo:
                    self._arrived.wait(0.5)
                    self._arrived.clear()
                    continue
                if self.process(todo):
                    delay = BACKOFF_START_S
                else:
                    self._stop.wait(delay)
                    delay = min(2 * delay, BACKOFF_MAX_S)
        finally:
            self.scp.stop()
            log.info("stopped; %d instance(s) left in the spool", len(self.pending()))

    def process(self, files: list[Path]) -> bool:
        """Run one batch of spooled files and deliver it; False when the server or the
        destination was unreachable (the files stay spooled for the next try)."""
        report = run_batch(files, self.work, **self.batch_args)
        if report.exit_code != EXIT_UNREACHABLE:
            deliver(report, [self.destination])
        log.info("batch of %d: %s", len(files), report.summary())
        if report.exit_code == EXIT_UNREACHABLE or not report.rows:
            log.warning("%s; the spooled instances wait for the next try", report.message)
            return False
        finished = [r for r in report.rows if r.get("status") in (DONE, SKIPPED, FAILED)]
        for row in finished:
            self._finish(row)
        # the manifest forgets finished instances: one pushed again later is done afresh
        manifest = Manifest(self.work / MANIFEST)
        try:
            for row in finished:
                if row.get("key"):
                    manifest.release(row["key"])
        finally:
            manifest.close()
        return True

    def _finish(self, row: dict[str, Any]) -> None:
        """Record a row's outcome durably, then clear its spooled file (and derived copy)."""
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **row}
        with open(self.results, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        source = Path(row["input"])
        derived = derived_file(row)
        if row.get("status") == DONE:  # (run_batch already said what it skipped or failed)
            log.info("done %s -> %s (%s)", source.name, derived.name if derived else "?",
                     ", ".join(row.get("delivered_to", [])))  # fmt: skip
        if derived is not None:
            derived.unlink(missing_ok=True)
        if source.parent != self.incoming or not source.exists():
            return
        if row.get("status") in (DONE, SKIPPED):
            source.unlink()
        else:
            os.replace(source, self.failed_dir / source.name)
            log.warning("kept %s in %s for the operator", source.name, self.failed_dir)
