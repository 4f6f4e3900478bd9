"""onnxruntime on the CPU: how a network runs in the served ``cpu`` target
(``model_repository/onnx_python``) and in the in-process pipeline (``train.pipeline``), so the
two cannot drift.

A call of one row runs in one session with all the configured intra-op threads. A call of
several rows (a dynamic batch: concurrent clients) is spread over the cores instead: with
``lanes`` = 2, the rows are split into two halves that run at the same time with half the
threads each, and a row left over (an odd batch) runs afterwards with all of them. On 2
cores the pair beats the batch: onnxruntime's two threads on one call give it only ~1.5x of
one thread (the GroupNorms, element-wise ops and layout changes between the convolutions
parallelise poorly), two calls of one thread give 2x. ``python -m benchmarks.lanes``, demo
networks, encoder + UNet + decoder in one process, ms per image (2026-11-26, 2 Xeon cores):
LR 64 batch 2 134 -> 105, batch 3 133 -> 110, batch 4 135 -> 106; LR 128 batch 2 482 -> 425.

Memory stays bounded as before: a batch is only split when ``lanes`` rows fit in the call
budget ``max_pixels`` (each lane then takes at most ``max_pixels // lanes`` pixels per call),
so larger images run one at a time as they did; and every session of the process takes its
memory from one shared onnxruntime arena (the environment allocator), so the lanes add a copy
of the weights (one session that both one-thread lanes call at once), not another arena.

Rows are independent of their batch, so the result is that of one call, to float rounding.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cxr_sr.host import usable_cores
from cxr_sr.serving import parse_flag, row_chunks

LANES_ENV = "CXR_ORT_LANES"  # overrides the config parameter ``cpu_lanes``
SPINNING_ENV = "CXR_ORT_SPINNING"  # overrides the config parameter ``intra_op_spinning``
MAX_LANES = 64
# what idle intra-op threads do: sleep ("off"), busy-wait only while a call runs ("run":
# onnxruntime's ``session.force_spinning_stop``), or keep busy-waiting between calls too
# ("on": onnxruntime's default)
SPIN_MODES = ("off", "run", "on")
DEFAULT_SPIN_MODE = "run"  # the builder's, and every session's unless told otherwise

_arena_lock = threading.Lock()
_arena_registered = False


def spin_mode(setting: str | bool) -> str:
    """One of :data:`SPIN_MODES` from a setting: a mode name, or a boolean (``True``/``False``
    or config text true/false, yes/no, 1/0: ``on`` / ``off``)."""
    text = str(setting).strip().lower()
    if text in SPIN_MODES:
        return text
    try:
        return "on" if parse_flag(text) else "off"
    except ValueError:
        raise ValueError(
            f"spinning must be one of {', '.join(SPIN_MODES)} (or true/false), got {setting!r}"
        ) from None


def spin_setting(configured: str | None) -> str:
    """The spin mode a network model uses: ``CXR_ORT_SPINNING`` where it is set, else its
    config parameter ``intra_op_spinning`` (``configured``), else :data:`DEFAULT_SPIN_MODE`;
    checked by :func:`spin_mode` (ValueError naming the choices)."""
    return spin_mode(os.environ.get(SPINNING_ENV) or configured or DEFAULT_SPIN_MODE)


def lane_setting(configured: str | None) -> str:
    """The lanes setting a network model uses: ``CXR_ORT_LANES`` where it is set, else its
    config parameter ``cpu_lanes`` (``configured``), else ``auto``."""
    return os.environ.get(LANES_ENV) or configured or "auto"


def lane_count(setting: str | int, threads: int) -> int:
    """How many lanes a network spreads a batch over: ``auto`` = 2 when it has at least 2
    intra-op ``threads`` (0: one per usable core), else 1; or an integer in [1, 64]."""
    text = str(setting).strip().lower()
    if text == "auto":
        return 2 if (threads or usable_cores()) >= 2 else 1
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"cpu lanes must be 'auto' or an integer, got {setting!r}") from None
    if not 1 <= value <= MAX_LANES:
        raise ValueError(f"cpu lanes must be in [1, {MAX_LANES}], got {value}")
    return value


def lane_plan(
    rows: int, pixels_per_row: int, max_pixels: int | None, lanes: int
) -> tuple[list[list[slice]], list[slice]]:
    """How ``rows`` rows run: (each lane's calls, the calls left to the one full session).

    The largest multiple of ``lanes`` rows is split into ``lanes`` consecutive equal parts,
    each in calls of at most ``max_pixels // lanes`` pixels; the rest (fewer than ``lanes``
    rows) runs afterwards in calls of at most ``max_pixels``. No lanes when there are fewer
    rows than lanes or when ``lanes`` rows do not fit in ``max_pixels`` (None: no limit)."""
    if lanes < 2 or rows < lanes or (max_pixels and pixels_per_row * lanes > max_pixels):
        return [], row_chunks(rows, pixels_per_row, max_pixels)
    shared = rows - rows % lanes
    per = shared // lanes
    cap = max_pixels // lanes if max_pixels else None

    def shifted(chunks: list[slice], offset: int) -> list[slice]:
        return [slice(offset + s.start, offset + s.stop) for s in chunks]

    lane_calls = [shifted(row_chunks(per, pixels_per_row, cap), i * per) for i in range(lanes)]
    if rows == shared:
        return lane_calls, []
    return lane_calls, shifted(row_chunks(rows - shared, pixels_per_row, max_pixels), shared)


def _shared_arena() -> None:
    """Register onnxruntime's environment CPU arena once per process."""
    global _arena_registered
    import onnxruntime as ort

    with _arena_lock:
        if not _arena_registered:
            info = ort.OrtMemoryInfo(
                "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
            )
            ort.create_and_register_allocator(info, None)
            _arena_registered = True


def session(
    path: str | Path,
    threads: int = 0,
    *,
    spinning: str | bool = DEFAULT_SPIN_MODE,
    arena: bool = True,
    mem_pattern: bool = False,
    shared_arena: bool = True,
):
    """An onnxruntime CPU session: ``threads`` intra-op threads (0: onnxruntime's default),
    no inter-op pool (the graph runs sequentially); ``spinning`` (:func:`spin_mode`): whether
    idle intra-op threads busy-wait, which matters when several sessions share the cores;
    ``arena``: a memory arena, the process's shared one when ``shared_arena``;
    ``mem_pattern``: onnxruntime's per-shape memory planning."""
    import onnxruntime as ort

    mode = spin_mode(spinning)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "0" if mode == "off" else "1"
    )
    if mode == "run":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = mem_pattern
    if arena and shared_arena:
        _shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class CpuNetwork:
    """One ONNX network on the CPU: :meth:`run` takes a batch of any size, in calls of at
    most ``max_pixels`` pixels (None: no limit), spread over ``lanes`` (module docstring).
    ``threads``: intra-op threads of the full session (0: one per usable core); the lanes run
    with ``threads // lanes`` each (at least 1). Other options as :func:`session`."""

    def __init__(
        self,
        path: str | Path,
        threads: int = 0,
        *,
        lanes: int = 1,
        max_pixels: int | None = None,
        spinning: str | bool = DEFAULT_SPIN_MODE,
        arena: bool = True,
        mem_pattern: bool = False,
    ):
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.threads = threads or usable_cores()
        self.lanes = lanes
        self.max_pixels = max_pixels or None
        kw = {"spinning": spinning, "arena": arena, "mem_pattern": mem_pattern}
        self.session = session(path, threads, **kw)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._lane_sessions = []
        self._pool = None
        if lanes > 1:
            per = max(1, self.threads // lanes)
            # one-thread sessions have no pool: concurrent calls of one session run on their
            # callers' threads, so the lanes share it (one more copy of the weights, not
            # ``lanes``); with more threads each lane needs its own pool
            count = 1 if per == 1 else lanes
            shared = [session(path, per, **kw) for _ in range(count)]
            self._lane_sessions = [shared[i % count] for i in range(lanes)]
            self._pool = ThreadPoolExecutor(lanes, thread_name_prefix="cxr-ort-lane")

    def _calls(self, sess, calls: Sequence[slice], outputs, feeds) -> list[list[np.ndarray]]:
        return [sess.run(outputs, {n: x[s] for n, x in feeds.items()}) for s in calls]

    def run(
        self, outputs: Sequence[str] | None, feeds: Mapping[str, np.ndarray]
    ) -> list[np.ndarray]:
        """The ``outputs`` (None: all) for ``feeds`` (equal batch sizes), rows in order."""
        first = feeds[self.input_names[0]]
        pixels = math.prod(first.shape[2:]) if first.ndim > 2 else 1
        lane_calls, rest = lane_plan(len(first), pixels, self.max_pixels, self.lanes)
        parts: list[list[np.ndarray]] = []
        if lane_calls:
            jobs = [
                self._pool.submit(self._calls, sess, calls, outputs, feeds)
                for sess, calls in zip(self._lane_sessions, lane_calls, strict=True)
            ]
            for job in jobs:
                parts.extend(job.result())
        parts.extend(self._calls(self.session, rest, outputs, feeds))
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(r) for r in zip(*parts, strict=True)]

    def close(self) -> None:
        """Stop the lanes' threads (the sessions go with the object)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
