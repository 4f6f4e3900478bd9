"""TensorRT engine build for the GPU target (kept thin: polygraphy over the TensorRT API).

TensorRT's libraries are not on PyPI; this runs inside NVIDIA's NGC containers
(``nvcr.io/nvidia/tensorrt`` or ``tritonserver:24.10-py3``). A plan only loads on the
TensorRT version that built it, so the version is recorded next to the plan and written
into the Triton config, and :func:`check_plan_version` refuses a mismatch.

    python -m cxr_sr.builders.trt check build/model_repository_gpu   # before starting the server
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

from cxr_sr.builders.specs import NetworkSpec

META_SUFFIX = ".json"


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None where it cannot be imported."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(tensorrt.__version__)


def profile_shapes(spec: NetworkSpec) -> list[tuple[str, tuple, tuple, tuple]]:
    """(input, min, opt, max) rows of the spec's optimisation profile: batch and sides, e.g.
    ``x_t`` (1, C, 16, 16), (4, C, 64, 64), (8, C, 256, 256) for LR sides 16-256 at f = 4
    (``polygraphy``'s ``Profile.add(name, min=, opt=, max=)``, TensorRT's
    ``IOptimizationProfile.set_shape``)."""
    return [(name, *shapes) for name, shapes in spec.profile().items()]


def build_engine(
    onnx_path: str | Path,
    spec: NetworkSpec,
    plan_path: str | Path,
    *,
    fp16: bool = True,
    workspace_gib: float = 4.0,
) -> Path:
    """ONNX -> serialized TensorRT plan with the spec's min/opt/max profile (dynamic batch
    and sides: one engine serves every LR size of the repository's range)."""
    version = tensorrt_version()
    if version is None:
        raise RuntimeError(
            "TensorRT is not importable here. Build GPU engines inside an NGC container "
            "(e.g. nvcr.io/nvidia/tritonserver:24.10-py3, TensorRT 10.5), see docker/README.md."
        )
    import tensorrt
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
    # polygraphy hands each key to IBuilderConfig.set_memory_pool_limit, which takes the enum
    # member only (a "WORKSPACE" string is a TypeError there).
    workspace = {tensorrt.MemoryPoolType.WORKSPACE: int(workspace_gib * 2**30)}
    config = CreateConfig(fp16=fp16, profiles=[profile], memory_pool_limits=workspace)
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
        raise FileNotFoundError(f"{meta} is missing: rebuild the plan with cxr_sr.builders.build")
    built = json.loads(meta.read_text())["tensorrt"]
    if runtime_version is None:
        raise RuntimeError(f"{plan_path} needs TensorRT {built}, and none is installed")
    if built.split(".")[:2] != runtime_version.split(".")[:2]:
        raise RuntimeError(
            f"{plan_path} was built with TensorRT {built} but this server has {runtime_version}; "
            "a plan only loads on the TensorRT version that built it: rebuild it on this server"
        )


def runtime_tensorrt_version() -> str | None:
    """TensorRT version of this machine: the Python module, else ``libnvinfer``'s own answer.

    The tritonserver image has TensorRT's libraries (its backend loads them) but no Python
    module, so ``getInferLibVersion()`` of ``libnvinfer.so.<major>`` is asked instead:
    ``major * 10000 + minor * 100 + patch`` from TensorRT 10 on (``* 1000`` before).
    """
    version = tensorrt_version()
    if version is not None:
        return version
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.getInferLibVersion.restype = ctypes.c_int32
        v = int(lib.getInferLibVersion())
        base = 10000 if v >= 100000 else 1000
        return f"{v // base}.{(v % base) // 100}.{v % 100}"
    return None


def check_repository(repository: str | Path, runtime_version: str | None) -> list[Path]:
    """Check every ``*.plan`` of a repository against ``runtime_version``; returns the plans.

    A model whose config says ``platform: "tensorrt_plan"`` but has no plan is an error too.
    """
    repository = Path(repository)
    if not repository.is_dir():
        raise FileNotFoundError(f"{repository} is not a folder")
    plans = sorted(repository.rglob("*.plan"))
    for config in sorted(repository.glob("*/config.pbtxt")):
        declared = 'platform: "tensorrt_plan"' in config.read_text()
        if declared and not any(p.is_relative_to(config.parent) for p in plans):
            raise FileNotFoundError(
                f"{config.parent.name} is a tensorrt_plan model without a model.plan: build it "
                "with `python -m cxr_sr.builders.build --target gpu --engine build` "
                "(docker/README.md)"
            )
    for plan in plans:
        check_plan_version(plan, runtime_version)
    return plans


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="TensorRT plan checks for a built repository.")
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check", help="refuse plans built by another TensorRT than this machine's"
    )
    check.add_argument("repository", type=Path, help="model repository to walk for *.plan")
    check.add_argument(
        "--runtime-version",
        default=os.environ.get("CXR_TRT_RUNTIME_VERSION"),
        help="TensorRT version to check against (default: env CXR_TRT_RUNTIME_VERSION, else "
        "the installed TensorRT)",
    )
    args = p.parse_args(argv)
    runtime = args.runtime_version or runtime_tensorrt_version()
    try:
        plans = check_repository(args.repository, runtime)
    except (FileNotFoundError, RuntimeError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if plans:
        print(f"{len(plans)} TensorRT plan(s) match TensorRT {runtime}")
    else:
        print(f"no TensorRT plans in {args.repository}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
