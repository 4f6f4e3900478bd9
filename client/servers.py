"""Several Triton servers behind one batch run: ``ServerPool(urls, make_client)``.

What ``client.batch.run_batch`` needs from its servers, kept apart from the job bookkeeping:

- ``model_identity``: wait for the servers, set aside those that do not answer (at least
  one must: :class:`UnreachableError`) and check that all serve one model
  (:class:`MixedModelsError`);
- ``upscale``: one image on the least busy server (ties in turn), retried on transient
  errors (``SRServerError.transient``: connection refused or reset, HTTP 502/503/504, gRPC
  UNAVAILABLE) with exponential backoff and jitter (``backoff_s``), the failing server set
  aside for the backoff; a refused request (400) is raised at once, never retried; after the
  retries :class:`UnreachableError`; a server that comes back serving another model than the
  run started with, :class:`ModelChangedError`.

Each thread has its own ``SRClient`` per URL (a client is not shared between threads).
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cxr_sr.client.triton import ModelIdentity, SRClient, SRServerError

DEFAULT_RETRIES = 6  # with the default backoff: about 30 s of waiting, a server restart's time
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
SET_ASIDE_S = 3600.0  # a server that did not answer at the start: out of this run


class UnreachableError(RuntimeError):
    """No server answered, after the retries."""


class ModelChangedError(RuntimeError):
    """A server came back (after a restart) serving another model than the run started with."""


class MixedModelsError(ValueError):
    """The servers given for one run serve different models."""


def backoff_s(
    attempt: int, base_s: float = DEFAULT_BACKOFF_S, cap_s: float = MAX_BACKOFF_S
) -> float:
    """Exponential backoff with jitter: ``min(cap, base * 2**attempt)`` times a uniform factor
    in [0.5, 1.5) (so clients that failed together do not retry together)."""
    return min(cap_s, base_s * 2**attempt) * random.uniform(0.5, 1.5)


class ServerPool:
    """Several Triton URLs: a client per URL and thread, the least busy URL for each request
    (ties in turn), a URL that failed set aside until its backoff has passed."""

    def __init__(self, urls: Sequence[str], make_client: Callable[[str], SRClient]) -> None:
        if not urls:
            raise ValueError("give at least one server URL")
        self.urls = list(dict.fromkeys(urls))
        self._make = make_client
        self._lock = threading.Lock()
        self._busy = dict.fromkeys(self.urls, 0)
        self._down_until = dict.fromkeys(self.urls, 0.0)
        self._turn = 0
        self._local = threading.local()
        self._clients: list[SRClient] = []

    def client(self, url: str) -> SRClient:
        clients = self._local.__dict__.setdefault("clients", {})
        if url not in clients:
            clients[url] = self._make(url)
            with self._lock:
                self._clients.append(clients[url])
        return clients[url]

    def reset(self, url: str) -> None:
        """Drop this thread's client of ``url`` (its connections may be dead)."""
        c = self._local.__dict__.get("clients", {}).pop(url, None)
        if c is not None:
            with contextlib.suppress(Exception):
                c.close()

    def acquire(self) -> str:
        with self._lock:
            now = time.monotonic()
            up = [u for u in self.urls if self._down_until[u] <= now] or self.urls
            self._turn += 1
            order = up[self._turn % len(up) :] + up[: self._turn % len(up)]
            url = min(order, key=lambda u: self._busy[u])
            self._busy[url] += 1
            return url

    def release(self, url: str) -> None:
        with self._lock:
            self._busy[url] -= 1

    def set_aside(self, url: str, seconds: float) -> None:
        with self._lock:
            self._down_until[url] = max(self._down_until[url], time.monotonic() + seconds)

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                with contextlib.suppress(Exception):
                    c.close()
            self._clients.clear()

    def model_identity(self, wait_s: float, say: Callable[[str], None]) -> ModelIdentity:
        """Wait up to ``wait_s`` for each server; set aside those that do not answer (at
        least one must, else :class:`UnreachableError`; ``say`` warns of the others) and
        check that all serve the same model (:class:`MixedModelsError`); returns its
        identity."""
        identities: dict[str, ModelIdentity] = {}
        errors = []
        for url in self.urls:
            c = self.client(url)
            try:
                c.wait_ready(wait_s)
                identities[url] = c.model_identity()
            except SRServerError as e:
                errors.append(str(e))
                self.set_aside(url, SET_ASIDE_S)
        if not identities:
            raise UnreachableError("; ".join(errors))
        for line in errors:
            say(f"cxr-sr: warning: {line}; going on without it")
        distinct = set(identities.values())
        if len(distinct) > 1:
            served = ", ".join(f"{u}: {m.short()}" for u, m in identities.items())
            raise MixedModelsError(
                f"the servers serve different models ({served}); give URLs of one model"
            )
        return distinct.pop()

    def upscale(
        self,
        lr: np.ndarray,
        model: ModelIdentity,
        *,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF_S,
        overlap: int | None = None,
        tile: int | None = None,
        sampling: dict[str, Any] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray, str, int]:
        """``SRClient.upscale(lr)`` ([H, W] -> [4H, 4W]) on the least busy server, retried
        up to ``retries`` times on transient errors after ``backoff_s(attempt, backoff)``
        seconds; returns the SR, the URL that made it and the retries it took.

        Raises :class:`UnreachableError` after the retries, :class:`ModelChangedError` when
        the server that answered a retry serves another ``model``, and a non-transient
        ``SRServerError`` at once."""
        last: SRServerError | None = None
        for attempt in range(retries + 1):
            url = self.acquire()
            try:
                client = self.client(url)
                sr = client.upscale(
                    lr, overlap=overlap, tile=tile, progress=progress, **(sampling or {})
                )
                if attempt and client.model_identity() != model:  # restarted: same model?
                    raise ModelChangedError(
                        f"{url} came back serving {client.model_identity().short()}, not "
                        f"{model.short()} this run started with; re-run with "
                        "--on-change redo to make every result with one model"
                    )
                return sr, url, attempt
            except SRServerError as e:
                if not e.transient:
                    raise
                last = e
                self.reset(url)
                delay = backoff_s(attempt, backoff)
                self.set_aside(url, delay)
                if attempt < retries:
                    time.sleep(delay)
            finally:
                self.release(url)
        raise UnreachableError(f"{last} (gave up after {retries + 1} attempts)")
