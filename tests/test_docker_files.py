"""docker/: the compose file, the Dockerfile's NGC tags, and the TensorRT plan check.

Docker cannot run here (no engine, no GPU, no TensorRT), so these tests check what can be
checked without it: the compose file's ports, health check and GPU reservation; that the
NGC images are the release whose Triton is the embedded server's (24.10 <-> 2.51); and
``builders.trt check`` (the entrypoint's first step) on fake plans with their meta JSON.
"""

from __future__ import annotations

import enum
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from cxr_sr.builders import trt
from cxr_sr.builders.specs import Geometry, network_specs

DOCKER = Path(__file__).resolve().parent.parent / "docker"
EMBEDDED_TRITON = "2.51"  # tritonserver in nvidia-pytriton 0.7.0 (docs/design.md)


def ngc_triton_version(release: str) -> str:
    """Triton version of an NGC release ``YY.MM``: 24.10 -> 2.51, 24.01 -> 2.42, 25.01 -> 2.54.

    Triton's minor version has gone up by one every monthly NGC release since 2.0.
    """
    yy, mm = (int(x) for x in release.split("."))
    return f"2.{12 * yy + mm - 247}"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def images() -> list[tuple[str, str, str]]:
    """(image, NGC release, stage name) of every FROM line of the Dockerfile."""
    froms = re.findall(
        r"^FROM\s+(\S+?):(\d\d\.\d\d)-py3(?:\s+AS\s+(\S+))?\s*$",
        (DOCKER / "Dockerfile").read_text(),
        flags=re.MULTILINE | re.IGNORECASE,
    )
    assert froms, "no FROM <image>:<YY.MM>-py3 line in docker/Dockerfile"
    return froms


def test_release_mapping():
    assert ngc_triton_version("24.10") == "2.51"
    assert ngc_triton_version("24.01") == "2.42"
    assert ngc_triton_version("23.12") == "2.41"


def test_dockerfile_serves_the_embedded_triton(images):
    runtime = [(img, rel) for img, rel, stage in images if img.endswith("/tritonserver")]
    assert runtime, "no nvcr.io/nvidia/tritonserver stage"
    for image, release in runtime:
        assert image == "nvcr.io/nvidia/tritonserver"
        assert ngc_triton_version(release) == EMBEDDED_TRITON, (image, release)
    # the plan builder must come from the same release: same TensorRT (10.5) as the server
    assert {rel for _, rel, _ in images} == {"24.10"}


def test_runtime_has_torch_for_the_default_gpu_loop():
    """The gpu target's sampler keeps its latents on the GPU as torch tensors by default, so
    the runtime stage installs the ``[torch]`` extra, whose pin is the project's one torch."""
    import tomllib

    from cxr_sr.builders.build import parse_args

    assert parse_args(["--checkpoint", "x", "--target", "gpu"]).gpu_loop == "torch"
    runtime = (DOCKER / "Dockerfile").read_text().split(" AS runtime", 1)[1]
    assert (
        'pip install ".[torch]"' in runtime
        and "import cxr_sr, cxr_sr.builders.trt, torch" in runtime
    )
    extras = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    (pin,) = extras["torch"]
    assert pin.startswith("torch==") and "cxr-sr[torch]" in extras["train"]
    assert not any(d.startswith("torch") for d in extras["train"])  # one pin, not two


@pytest.mark.integration
def test_dockerfile_tag_matches_the_running_embedded_server(server, images):
    """The version the embedded server reports is the one the NGC tag carries."""
    import tritonclient.http as http

    version = http.InferenceServerClient(server.http_url).get_server_metadata()["version"]
    release = next(rel for img, rel, _ in images if img.endswith("/tritonserver"))
    assert version.rsplit(".", 1)[0] == ngc_triton_version(release)


def _gpu_reserved(service: dict) -> bool:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_compose_ports_healthcheck_and_gpu(compose):
    triton = compose["services"]["triton"]
    container_ports = sorted(int(str(p).rsplit(":", 1)[-1]) for p in triton["ports"])
    assert container_ports == [8000, 8001, 8002]
    health = " ".join(map(str, triton["healthcheck"]["test"]))
    assert "cxr_sr.builders.probe" in health and ":8000" in health  # a real inference
    assert triton["environment"]["CXR_ADMIN_KEY_FILE"].startswith("/run/secrets/")
    assert "cxr_admin_key" in triton["secrets"] and triton["restart"] == "unless-stopped"
    assert _gpu_reserved(triton)
    assert _gpu_reserved(compose["services"]["build-engine"])
    wait = triton["depends_on"]["build-engine"]["condition"]
    assert wait == "service_completed_successfully"
    assert triton["build"]["target"] == "runtime"


def test_scripts_are_executable_and_check_before_serving():
    for name in ("entrypoint.sh", "build_repository.sh"):
        assert (DOCKER / name).stat().st_mode & 0o111, f"{name} is not executable"
    entry = (DOCKER / "entrypoint.sh").read_text()
    assert entry.index("cxr_sr.builders.trt check") < entry.index(
        "exec python3 -m cxr_sr.builders.serve"
    )
    assert "--on-failure exit" in entry  # compose restarts only containers that exit


# ------------------------------------------------------------------ builders.trt check


def _plan(repo: Path, model: str = "unet", version: str | None = "10.5.0") -> Path:
    folder = repo / model / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (repo / model / "config.pbtxt").write_text(f'name: "{model}"\nplatform: "tensorrt_plan"\n')
    plan = folder / "model.plan"
    plan.write_bytes(b"not really an engine")
    if version is not None:
        trt.write_plan_meta(plan, version, fp16=True)
    return plan


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cxr_sr.builders.trt", "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=DOCKER.parent,
    )


def test_check_plan_version_match_and_mismatch(tmp_path):
    plan = _plan(tmp_path)
    trt.check_plan_version(plan, "10.5.0.18")  # same major.minor: fine
    with pytest.raises(RuntimeError, match=r"built with TensorRT 10\.5\.0 .* has 10\.6"):
        trt.check_plan_version(plan, "10.6.0")
    with pytest.raises(RuntimeError, match="none is installed"):
        trt.check_plan_version(plan, None)


def _unet_spec():
    geometry = Geometry(vae_factor=8, multiple=8, min_side=16, max_side=256)
    return network_specs(4, geometry, max_batch=8)["unet"]


def test_build_engine_without_tensorrt_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(RuntimeError, match="TensorRT is not importable here.*NGC container"):
        trt.build_engine(tmp_path / "unet.onnx", _unet_spec(), tmp_path / "model.plan")
    assert not (tmp_path / "model.plan.json").exists()


def test_build_engine_hands_polygraphy_the_spec_profile(tmp_path, monkeypatch):
    """The glue between the spec and polygraphy, with TensorRT's own calls replaced (the
    engine build itself needs TensorRT and a GPU: docker/README.md). The workspace limit must
    be keyed by ``tensorrt.MemoryPoolType.WORKSPACE``: TensorRT's ``set_memory_pool_limit``,
    which polygraphy calls with each key, refuses anything else."""
    from polygraphy.backend import trt as poly

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.5.0.18"
    fake.MemoryPoolType = MemoryPoolType
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    calls = {}
    monkeypatch.setattr(poly, "network_from_onnx_path", lambda path: ("network", path))
    monkeypatch.setattr(
        poly, "engine_from_network", lambda net, config: calls.update(net=net, config=config)
    )
    monkeypatch.setattr(poly, "save_engine", lambda engine, path: Path(path).write_bytes(b"x"))

    spec = _unet_spec()
    plan = trt.build_engine(tmp_path / "unet.onnx", spec, tmp_path / "1" / "model.plan")

    assert plan == tmp_path / "1" / "model.plan" and plan.read_bytes() == b"x"
    assert calls["net"] == ("network", str(tmp_path / "unet.onnx"))
    config = calls["config"]
    assert config.fp16 is True
    assert config.memory_pool_limits == {MemoryPoolType.WORKSPACE: 4 * 2**30}
    (profile,) = config.profiles
    assert {name: tuple(shapes) for name, shapes in profile.items()} == spec.profile()
    assert json.loads((tmp_path / "1" / "model.plan.json").read_text()) == {
        "tensorrt": "10.5.0.18",
        "fp16": True,
    }
    trt.check_plan_version(plan, "10.5.1")  # the meta it wrote is what the entrypoint checks


def test_check_plan_version_without_meta(tmp_path):
    plan = _plan(tmp_path, version=None)
    with pytest.raises(FileNotFoundError, match="missing"):
        trt.check_plan_version(plan, "10.5.0")


def test_cli_match_exits_zero(tmp_path):
    _plan(tmp_path)
    done = _cli(str(tmp_path), "--runtime-version", "10.5.0")
    assert done.returncode == 0, done.stderr
    assert "1 TensorRT plan(s) match TensorRT 10.5.0" in done.stdout


def test_cli_mismatch_exits_non_zero_with_the_message(tmp_path):
    _plan(tmp_path)
    done = _cli(str(tmp_path), "--runtime-version", "10.7.0")
    assert done.returncode == 1
    assert "built with TensorRT 10.5.0" in done.stderr and "rebuild it" in done.stderr


def test_cli_missing_meta_is_an_error(tmp_path):
    _plan(tmp_path, version=None)
    done = _cli(str(tmp_path), "--runtime-version", "10.5.0")
    assert done.returncode == 1 and "missing" in done.stderr


def test_cli_declared_plan_absent_is_an_error(tmp_path):
    plan = _plan(tmp_path)
    plan.unlink()
    Path(str(plan) + trt.META_SUFFIX).unlink()
    done = _cli(str(tmp_path), "--runtime-version", "10.5.0")
    assert done.returncode == 1 and "without a model.plan" in done.stderr


def test_cli_repository_without_plans_passes(tmp_path):
    (tmp_path / "vae_encoder").mkdir()
    (tmp_path / "vae_encoder" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    done = _cli(str(tmp_path), "--runtime-version", "10.5.0")
    assert done.returncode == 0 and "no TensorRT plans" in done.stdout


def test_cli_runtime_version_from_environment(tmp_path, monkeypatch):
    _plan(tmp_path)
    monkeypatch.setenv("CXR_TRT_RUNTIME_VERSION", "9.3.0")
    done = _cli(str(tmp_path))
    assert done.returncode == 1 and "has 9.3.0" in done.stderr


def test_meta_is_json_with_the_version(tmp_path):
    plan = _plan(tmp_path, version="10.5.0")
    meta = json.loads(Path(str(plan) + trt.META_SUFFIX).read_text())
    assert meta == {"tensorrt": "10.5.0", "fp16": True}
