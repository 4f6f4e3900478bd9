"""DICOM node mode: receive studies over C-STORE, super-resolve them, send the derived series
on, the way AI nodes are wired into a hospital's DICOM network.

    node = Node(spool="/var/spool/cxr-sr", destination=parse_destination("dimse:PACS@pacs:104"),
                url="127.0.0.1:8000", port=11112)
    node.run(stop_event)        # until stop_event is set (``cxr-sr listen`` sets it on SIGTERM)

How an instance travels (and why nothing is lost when the node dies):

1. the C-STORE SCP (``client.dimse.StoreSCP``) writes it to ``<spool>/incoming/`` durably
   and only then answers Success to the sender;
2. a worker (``workers`` of them, each with its own Triton client) reads it, skips it with a
   logged reason when it is outside the model's domain (unless ``force``), else upscales it
   and delivers the derived instance to the destination (``client.studies.process_instance``);
3. the outcome is appended to ``<spool>/results.jsonl`` (one JSON row per instance), and the
   spooled file is deleted (done, skipped) or moved to ``<spool>/failed/`` (failed: kept for
   the operator, with the reason in the results);
4. while the Triton server or the destination is unreachable, the instance stays in
   ``incoming/`` and the worker retries with exponential backoff (1 s doubling to 60 s).

So ``incoming/`` is the durable queue: a node that is stopped (SIGTERM/SIGINT: it stops
accepting, finishes the instances in hand and exits) or killed resumes every instance still
there when it starts again. A re-processed instance gets the same derived UIDs, so it replaces
its earlier copy at the destination instead of duplicating it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from cxr_sr.client.dimse import DEFAULT_AE_TITLE, Received, StoreSCP
from cxr_sr.client.pacs import PacsUnreachableError
from cxr_sr.client.studies import (
    DONE,
    FAILED,
    SKIPPED,
    Destination,
    InstanceResult,
    process_instance,
)
from cxr_sr.client.triton import DEFAULT_IN_FLIGHT, SRClient, SRConnectionError

log = logging.getLogger(__name__)

BACKOFF_START_S, BACKOFF_MAX_S = 1.0, 60.0


class Node:
    """A C-STORE SCP feeding a bounded pool of super-resolution workers.

    Args:
        spool: the node's folder (``incoming/``, ``failed/``, ``results.jsonl``).
        destination: where derived instances go (``client.studies.parse_destination``).
        url, protocol, model, timeout_s: the Triton server (one ``SRClient`` per worker).
        ae_title, host, port, allowed_aes: the SCP's (``client.dimse.StoreSCP``).
        workers: instances processed at once (bounded concurrency).
        force: process inputs outside the model's domain instead of skipping them.
        sampling: request-schema keywords for every request (``steps``, ``seed``, ...).
        on_result: called with each :class:`InstanceResult` (after it is logged).
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
        force: bool = False,
        sampling: dict[str, Any] | None = None,
        on_result: Callable[[InstanceResult], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.spool = Path(spool)
        self.incoming = self.spool / "incoming"
        self.failed_dir = self.spool / "failed"
        self.results = self.spool / "results.jsonl"
        self.destination = destination
        self.client_args = dict(
            url=url,
            protocol=protocol,
            model=model,
            timeout_s=timeout_s,
            in_flight=DEFAULT_IN_FLIGHT,
        )
        self.workers = workers
        self.force = force
        self.sampling = dict(sampling or {})
        self.on_result = on_result
        self.scp = StoreSCP(
            self.incoming,
            ae_title=ae_title,
            host=host,
            port=port,
            on_stored=self._received,
            allowed_aes=allowed_aes,
        )
        self._queue: queue.Queue[Path] = queue.Queue()
        self._queued: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # the queue: every path once, however often it is received while waiting

    def _enqueue(self, path: Path) -> None:
        with self._lock:
            if path in self._queued:
                return
            self._queued.add(path)
        self._queue.put(path)

    def _received(self, item: Received) -> None:
        self._enqueue(item.path)

    def pending(self) -> list[Path]:
        """Spooled instances not yet finished (oldest first)."""
        if not self.incoming.is_dir():
            return []
        files = [p for p in self.incoming.glob("*.dcm") if p.is_file()]
        return sorted(files, key=lambda p: p.stat().st_mtime)

    def run(
        self, stop: threading.Event | None = None, ready: Callable[[Node], None] | None = None
    ) -> None:
        """Resume the spool, listen, and process until ``stop`` is set; then stop accepting,
        finish the instances in hand and return (what is left stays spooled)."""
        self._stop = stop or threading.Event()
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        resumed = self.pending()
        for path in resumed:
            self._enqueue(path)
        if resumed:
            log.info("resuming %d spooled instance(s)", len(resumed))
        threads = [
            threading.Thread(target=self._work, name=f"cxr-sr-worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        for t in threads:
            t.start()
        self.scp.start()
        try:
            if ready is not None:
                ready(self)
            self._stop.wait()
        finally:
            self.scp.stop()
            self._stop.set()
            for t in threads:
                t.join()
            log.info("stopped; %d instance(s) left in the spool", len(self.pending()))

    def _work(self) -> None:
        client = SRClient(**self.client_args)
        try:
            identity = None
            while not self._stop.is_set():
                try:
                    path = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                identity = self._process_with_retry(client, path, identity)
        finally:
            client.close()

    def _process_with_retry(self, client: SRClient, path: Path, identity):
        """Process one spooled file, retrying while the server or destination is down."""
        delay = BACKOFF_START_S
        while not self._stop.is_set():
            try:
                identity = identity or client.model_identity()
                self._process(client, path, identity)
                break
            except (SRConnectionError, PacsUnreachableError) as e:
                log.warning("%s; retrying %s in %.0f s", e, path.name, delay)
                self._stop.wait(delay)
                delay = min(2 * delay, BACKOFF_MAX_S)
        with self._lock:
            self._queued.discard(path)
        return identity

    def _process(self, client: SRClient, path: Path, identity) -> None:
        try:
            ds = pydicom.dcmread(path)
        except FileNotFoundError:
            return  # finished already (it was queued twice)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as e:
            row = InstanceResult(str(path.name), reason=f"not a readable DICOM file ({e})")
        else:
            row = process_instance(
                client,
                ds,
                path.name,
                [self.destination],
                force=self.force,
                model=identity,
                upscale=self.sampling,
            )
        self._finish(path, row)

    def _finish(self, path: Path, row: InstanceResult) -> None:
        """Record the outcome durably, then clear the spooled file."""
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **asdict(row)}
        with self._lock, open(self.results, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if row.status in (DONE, SKIPPED):
            path.unlink(missing_ok=True)
        else:
            os.replace(path, self.failed_dir / path.name)
        if row.status == SKIPPED:
            log.info("skipped %s: %s", row.sop_instance_uid or path.name, row.reason)
        elif row.status == FAILED:
            log.warning("failed %s: %s", row.sop_instance_uid or path.name, row.reason)
        else:
            log.info(
                "done %s -> %s (%s)",
                row.sop_instance_uid,
                row.derived_sop_instance_uid,
                ", ".join(row.delivered_to),
            )
        if self.on_result is not None:
            self.on_result(row)
