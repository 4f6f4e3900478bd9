"""TensorRT engine build for the GPU target (kept thin: polygraphy over the TensorRT API).

TensorRT's libraries are not on PyPI; this runs inside NVIDIA's NGC containers
(``nvcr.io/nvidia/tensorrt`` or ``tritonserver:24.10-py3``). A plan only loads on the
TensorRT version that built it, so the version is recorded next to the plan and written
into the Triton config, and :func:`check_plan_version` refuses a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

from builders.specs import NetworkSpec

META_SUFFIX = ".json"


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None where it cannot be imported."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def profile_shapes(spec: NetworkSpec) -> list[tuple[str, tuple, tuple, tuple]]:
    """(input, min, opt, max) rows of the spec's optimisation profile."""
    return [(name, *shapes) for name, shapes in spec.profile().items()]


def build_engine(
    onnx_path: str | Path,
    spec: NetworkSpec,
    plan_path: str | Path,
    *,
    fp16: bool = True,
    workspace_gib: float = 4.0,
) -> Path:
    """ONNX -> serialized TensorRT plan with the spec's min/opt/max profile."""
    version = tensorrt_version()
    if version is None:
        raise RuntimeError(
            "TensorRT is not importable here. Build GPU engines inside an NGC container "
            "(e.g. nvcr.io/nvidia/tritonserver:24.10-py3, TensorRT 10.5), see docker/README.md."
        )
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_from_network,
        network_from_onnx_path,
        save_engine,
    )

    profile = Profile()
    for name, lo, opt, hi in profile_shapes(spec):
        profile.add(name, min=lo, opt=opt, max=hi)
    config = CreateConfig(
        fp16=fp16, profiles=[profile], memory_pool_limits={"WORKSPACE": int(workspace_gib * 2**30)}
    )
    engine = engine_from_network(network_from_onnx_path(str(onnx_path)), config=config)
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, str(plan_path))
    write_plan_meta(plan_path, version, fp16)
    return plan_path


def write_plan_meta(plan_path: Path, version: str, fp16: bool) -> Path:
    meta = plan_path.with_suffix(plan_path.suffix + META_SUFFIX)
    meta.write_text(json.dumps({"tensorrt": version, "fp16": fp16}) + "\n")
    return meta


def check_plan_version(plan_path: str | Path, runtime_version: str | None) -> None:
    """Raise a clear error when a plan was built by another TensorRT than the runtime's."""
    meta = Path(str(plan_path) + META_SUFFIX)
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} is missing: rebuild the plan with builders.build")
    built = json.loads(meta.read_text())["tensorrt"]
    if runtime_version is None:
        raise RuntimeError(f"{plan_path} needs TensorRT {built}, and none is installed")
    if built.split(".")[:2] != runtime_version.split(".")[:2]:
        raise RuntimeError(
            f"{plan_path} was built with TensorRT {built} but this server has {runtime_version}; "
            "a plan only loads on the TensorRT version that built it: rebuild it on this server"
        )
