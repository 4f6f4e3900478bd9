"""Shared fixtures: a tiny random checkpoint, its built repository, and a real tritonserver.

Session-scoped so every test module shares one checkpoint, one cpu-target repository
(max batch 4) and one server on 127.0.0.1 with free ports, stopped at the end.

Test tiers (markers registered in pyproject.toml):
- ``integration``: starts or talks to a real tritonserver. Any test that uses the ``server``
  fixture is marked here automatically; a test that starts its own server (``TritonServer``,
  ``cxr_sr.builders.serve`` or ``demo`` in a subprocess) must carry the mark itself.
- ``slow``: takes more than a few seconds on 2 CPU cores (training runs, repository builds);
  tests that use ``built_repository`` are marked here automatically.
- ``gpu``: needs a CUDA GPU; skipped here when torch sees none.
``make test-fast`` runs ``-m "not integration and not slow"``; ``make test`` runs everything.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """Mark tests by the shared fixtures they use (directly or through another fixture).

    ``server`` starts tritonserver: integration. ``built_repository`` exports three ONNX
    graphs and writes a repository (15-30 s on 2 cores): slow.
    """
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "server" in names:
            item.add_marker(pytest.mark.integration)
        if "built_repository" in names:
            item.add_marker(pytest.mark.slow)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
        for item in gpu_items:
            item.add_marker(skip)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


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
    """(repository, onnx folder) built from :func:`checkpoint` for the cpu target, serving
    LR sides 16-128 (the tiny UNet's mid-block attention would take GBs at larger sides)."""
    from cxr_sr.builders import build

    root = tmp_path_factory.mktemp("build")
    repo, onnx = root / "repo", root / "onnx"
    args = ["--checkpoint", str(checkpoint), "--out", str(repo), "--onnx-dir", str(onnx)]
    assert build.main([*args, "--max-batch", "4", "--max-side", "128"]) == 0
    return repo, onnx


@pytest.fixture(scope="session")
def server(built_repository):
    """The embedded tritonserver on the tiny repository (log next to the repository)."""
    from cxr_sr.builders.serve import TritonServer

    repo, _ = built_repository
    with TritonServer(repo, log_file=repo.parent / "triton.log") as s:
        yield s


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc PACS (DICOMweb plugin, HTTP basic auth) on free loopback ports
    (``tests/orthanc.py``), stopped at the end. The AE ``CXRSR`` at 127.0.0.1:``node_port`` is
    registered as modality ``CXRSR``: node-mode tests listen there. Tests that use it carry
    the ``integration`` mark and call ``orthanc.clear()`` first."""
    from orthanc import Orthanc

    from cxr_sr.builders.serve import free_port

    node_port = free_port()
    node = {"CXRSR": ("CXRSR", "127.0.0.1", node_port)}
    with Orthanc(tmp_path_factory.mktemp("orthanc"), modalities=node) as pacs:
        pacs.node_port = node_port
        yield pacs
