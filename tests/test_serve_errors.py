"""A repository that cannot load: the server's start fails with the model's name and
Triton's reason, and the serve command exits non-zero saying the same."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cxr_sr.builders.serve import TritonServer, load_failures

LOG = (
    "E1126 03:48:57.893034 31457 model_lifecycle.cc:642] \"failed to load 'unet' version 1: "
    'Internal: ImportError: libfoo.so: cannot open shared object file\\n\\nAt:\\n  x.py(1)"\n'
    "I1126 03:48:57.893142 31457 model_lifecycle.cc:777] \"failed to load 'unet'\"\n"
)


def test_load_failures_reads_the_model_and_the_first_line_of_the_reason():
    assert load_failures(LOG) == {
        "unet": "Internal: ImportError: libfoo.so: cannot open shared object file"
    }
    assert load_failures("I1126 server is ready\n") == {}


@pytest.fixture(scope="module")
def broken_repository(built_repository, tmp_path_factory):
    """The tiny repository with vae_decoder's ONNX file replaced by garbage."""
    repo, _ = built_repository
    broken = tmp_path_factory.mktemp("broken") / "repo"
    shutil.copytree(repo, broken)
    (broken / "vae_decoder" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return broken


@pytest.mark.integration
def test_a_model_that_fails_to_load_is_named_with_its_reason(broken_repository):
    with pytest.raises(RuntimeError) as err:
        TritonServer(broken_repository).start(timeout_s=120)
    message = str(err.value)
    assert "model 'vae_decoder'" in message
    assert "onnx" in message.lower()


@pytest.mark.integration
def test_serve_exits_non_zero_naming_the_model(broken_repository):
    done = subprocess.run(
        [sys.executable, "-m", "cxr_sr.builders.serve", "--repository", str(broken_repository)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode != 0
    assert "model 'vae_decoder'" in done.stderr, done.stderr[-2000:]


@pytest.mark.integration
def test_a_bad_noise_thread_setting_fails_the_load_not_every_request(built_repository, monkeypatch):
    """CXR_NOISE_THREADS is read when the sampler loads: a typo stops the start with the
    variable's name instead of failing each request later with a 500."""
    repo, _ = built_repository
    monkeypatch.setenv("CXR_NOISE_THREADS", "two")
    with pytest.raises(RuntimeError) as err:
        TritonServer(repo).start(timeout_s=120)
    assert "model 'sampler'" in str(err.value)
    assert "CXR_NOISE_THREADS must be an integer, got 'two'" in str(err.value)


@pytest.mark.integration
@pytest.mark.parametrize(
    "variable,value,message",
    [
        ("CXR_ORT_LANES", "many", "cpu lanes must be 'auto' or an integer, got 'many'"),
        ("CXR_ORT_SPINNING", "always", "spinning must be one of off, run, on"),
    ],
)
def test_a_bad_onnxruntime_setting_fails_the_load_not_every_request(
    built_repository, monkeypatch, variable, value, message
):
    """CXR_ORT_LANES and CXR_ORT_SPINNING (or cpu_lanes, intra_op_spinning) are read when the
    onnxruntime models load: a typo stops the start, naming a model and the setting."""
    repo, _ = built_repository
    monkeypatch.setenv(variable, value)
    with pytest.raises(RuntimeError) as err:
        TritonServer(repo).start(timeout_s=120)
    assert "model 'vae_" in str(err.value) or "model 'unet'" in str(err.value)
    assert message in str(err.value)


def test_tritonserver_runs_on_jemalloc_unless_told_otherwise(built_repository, monkeypatch):
    """jemalloc (system-packages.txt) is preloaded for tritonserver and its stubs, with its
    page-return settings; CXR_MALLOC=system keeps glibc's malloc."""
    from cxr_sr.builders.serve import JEMALLOC, JEMALLOC_CONF

    repo, _ = built_repository
    installed = next(p for p in JEMALLOC if Path(p).is_file())  # the set-up installs it
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    env = TritonServer(repo)._environment()
    assert env["LD_PRELOAD"].split(":")[0] == installed
    assert env["MALLOC_CONF"] == JEMALLOC_CONF
    monkeypatch.setenv("CXR_MALLOC", "system")
    assert "LD_PRELOAD" not in TritonServer(repo)._environment()


def test_numpy_2_is_refused_where_the_stub_would_garble_tensors(built_repository, tmp_path):
    """The wheel's stub is built for numpy 1.x: under numpy 2 the cpu target's models (numpy
    bridge) are named and the server refuses to start; a torch-target repository (DLPack) and
    numpy 1.x pass."""
    from cxr_sr.builders.serve import numpy_bridge_models

    repo, _ = built_repository
    assert numpy_bridge_models(repo, "2.5.2") == [
        "sampler",
        "unet",
        "vae_decoder",
        "vae_encoder",
    ]
    assert numpy_bridge_models(repo, "1.26.4") == []
    torch_like = tmp_path / "torch"
    for name in ("sampler", "unet"):
        shutil.copytree(repo / name, torch_like / name)
        (torch_like / name / "1" / "model.onnx").unlink(missing_ok=True)
    config = torch_like / "sampler" / "config.pbtxt"
    config.write_text(config.read_text().replace('"numpy"', '"torch-auto"'))
    assert numpy_bridge_models(torch_like, "2.0.0") == []


def test_serve_names_the_numpy_problem_before_starting(built_repository, monkeypatch):
    import numpy

    monkeypatch.setattr(numpy, "__version__", "2.5.2")
    with pytest.raises(RuntimeError, match=r"numpy 2\.5\.2 .*sampler, unet.*'numpy<2'"):
        TritonServer(built_repository[0]).start()


def test_free_ports_are_distinct_within_a_process(monkeypatch):
    """The kernel may return one ephemeral port to two binds in a row; a server then got one
    port for HTTP and gRPC and would not start. free_port never hands a port out twice."""
    import socket

    from cxr_sr.builders import serve

    real = socket.socket
    ports = iter([40001, 40001, 40001, 40002])

    class Repeating(real):
        def getsockname(self):
            return ("127.0.0.1", next(ports))

    monkeypatch.setattr(serve.socket, "socket", Repeating)
    monkeypatch.setattr(serve, "_HANDED_OUT", serve.collections.deque(maxlen=8))
    assert [serve.free_port(), serve.free_port()] == [40001, 40002]
