"""Shared fixtures: a tiny random checkpoint and a real tritonserver serving it.

Session-scoped so the integration and perf_analyzer tests build and start one server:
a cpu-target repository (max batch 4) on 127.0.0.1 with free ports, stopped at the end.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random-weight checkpoint folder (VAE channels 8-16-16, UNet 16-32)."""
    from cxr_sr.train.checkpoint import random_init
    from cxr_sr.train.models import UNetConfig, VAEConfig

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    return random_init(
        folder,
        VAEConfig(channels=[8, 16, 16], norm_groups=4),
        UNetConfig(channels=[16, 32], norm_groups=8),
        seed=3,
    )


@pytest.fixture(scope="session")
def built_repository(checkpoint, tmp_path_factory):
    """(repository, onnx folder) built from :func:`checkpoint` for the cpu target."""
    from cxr_sr.builders import build

    root = tmp_path_factory.mktemp("build")
    repo, onnx = root / "repo", root / "onnx"
    args = ["--checkpoint", str(checkpoint), "--out", str(repo), "--onnx-dir", str(onnx)]
    assert build.main([*args, "--max-batch", "4"]) == 0
    return repo, onnx


@pytest.fixture(scope="session")
def server(built_repository):
    """The embedded tritonserver on the tiny repository (log next to the repository)."""
    from cxr_sr.builders.serve import TritonServer

    repo, _ = built_repository
    with TritonServer(repo, log_file=repo.parent / "triton.log") as s:
        yield s
