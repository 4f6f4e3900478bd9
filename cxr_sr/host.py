"""Facts about the host this process runs on, read where they are needed (never cached: a
process's CPU affinity can change, and tests set it)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The logical cores this process may run on: its CPU affinity where the platform has one
    (Linux: a container's or ``taskset``'s limit), else every logical core; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
