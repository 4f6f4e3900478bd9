"""Shared pieces of the benchmark scripts: device and versions, real LR inputs, tables.

Every benchmark reports where it ran (CPU model, cores, GPU if any) and with what
(Python, onnxruntime, numpy, tritonclient, the server's Triton version), so a table is
never separated from the machine that produced it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from cxr_sr import SamplingOptions, Schedule
from cxr_sr.host import usable_cores
from cxr_sr.imaging import HR_SIZE, SCALE, Pair, native_pair, reference_pair


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """GPU names from ``nvidia-smi`` (empty where there is no NVIDIA driver)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def device_info() -> dict[str, Any]:
    """Where this process runs: CPU model, logical cores (all and usable), GPUs, OS."""
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "gpus": gpu_names(),
        "os": f"{platform.system()} {platform.release()}",
    }


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def server_version(url: str, protocol: str = "grpc") -> str | None:
    """The Triton version a running server reports in its metadata (None if unreachable)."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as client

            meta = client.InferenceServerClient(url).get_server_metadata(as_json=True)
        else:
            import tritonclient.http as client

            meta = client.InferenceServerClient(url).get_server_metadata()
    except Exception:  # noqa: BLE001 - any client failure means "unknown"
        return None
    return str(meta.get("version")) if meta else None


def software_versions(triton: str | None = None) -> dict[str, str | None]:
    """Versions of the pieces that shape the numbers; ``triton`` from :func:`server_version`."""
    return {
        "python": platform.python_version(),
        "tritonserver": triton,
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "numpy": _version("numpy"),
        "tritonclient": _version("tritonclient"),
        "nvidia-pytriton": _version("nvidia-pytriton"),
    }


def describe(device: dict[str, Any], versions: dict[str, str | None]) -> str:
    """Two lines for the top of a table."""
    gpus = ", ".join(device["gpus"]) or "none"
    soft = "  ".join(f"{k} {v}" for k, v in versions.items() if v)
    return (
        f"device: {device['cpu']} ({device['usable_cores']} of {device['logical_cores']} "
        f"logical cores usable), GPU: {gpus}\nversions: {soft}"
    )


def _radiograph() -> np.ndarray | None:
    """The bundled radiograph in [0, 1] (``RG1_UNCI.dcm``), or None where it is not installed."""
    try:
        from pydicom.data import get_testdata_file

        from cxr_sr.client.io import read_image

        path = get_testdata_file("RG1_UNCI.dcm")
        return read_image(path) if path else None
    except ImportError:
        return None


def native_crops(side: int, count: int, seed: int = 0) -> list[Pair]:
    """``count`` real (HR, LR) pairs with ``side`` x ``side`` LR: the native-scale protocol
    (``cxr_sr.imaging.native_pair``: LR = 4x area downsample of the image at its own pixels) on
    random ``4 * side`` squares of the bundled radiograph (chest phantoms where it is absent),
    so every size is the same kind of picture."""
    if count < 1 or side < 1:
        raise ValueError(f"need count >= 1 and side >= 1, got {count}, {side}")
    rng = np.random.default_rng(seed)
    image = _radiograph()
    hr_side = SCALE * side
    out = []
    for _ in range(count):
        if image is None or min(image.shape) < hr_side:
            from cxr_sr.train.data.phantom import chest_phantom

            crop = chest_phantom(hr_side, seed=int(rng.integers(1 << 31)))
        else:
            h, w = image.shape
            top, left = int(rng.integers(0, h - hr_side + 1)), int(rng.integers(0, w - hr_side + 1))
            crop = image[top : top + hr_side, left : left + hr_side]
        out.append(native_pair(crop))
    return out


def lr_crops(side: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` real LR inputs of ``side`` x ``side``, float32 ``[count, 1, side, side]``: the
    LR side of :func:`native_crops`."""
    lr = np.stack([pair.lr for pair in native_crops(side, count, seed)])[:, None]
    return np.clip(lr, 0.0, 1.0).astype(np.float32)


def lr_images(count: int, seed: int = 0) -> np.ndarray:
    """``count`` real LR inputs, float32 ``[count, 1, 64, 64]`` in [0, 1].

    Square crops of the bundled radiograph (``RG1_UNCI.dcm`` from ``pydicom-data``) at random
    positions and sizes, put through the reference protocol (``cxr_sr.imaging.reference_pair``,
    as the client, training and evaluation do). Where that file is not installed, synthetic
    chest phantoms stand in.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    image = _radiograph()
    out = []
    for _ in range(count):
        if image is None:
            from cxr_sr.train.data.phantom import chest_phantom

            crop = chest_phantom(HR_SIZE * 2, seed=int(rng.integers(1 << 31)))
        else:
            h, w = image.shape
            side = int(rng.integers(HR_SIZE, min(h, w) + 1))
            top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            crop = image[top : top + side, left : left + side]
        out.append(reference_pair(crop).lr)
    lr = np.stack(out)[:, None].astype(np.float32)  # [count, 1, 64, 64]
    return np.clip(lr, 0.0, 1.0)


def repository_sampling(repository: str | Path) -> tuple[Schedule, SamplingOptions]:
    """The schedule and sampling defaults a built repository's sampler serves with (copied
    there from the checkpoint by ``builders.build``)."""
    folder = Path(repository) / "sampler" / "1"
    if not (folder / "sampling.json").is_file():
        raise FileNotFoundError(
            f"{repository}: no sampler/1/sampling.json (run `python -m cxr_sr.builders.build`)"
        )
    defaults = SamplingOptions(**json.loads((folder / "sampling.json").read_text()))
    return Schedule.load(folder), defaults


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table; floats get 1-2 decimals, None prints as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


TRITON_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}


def grpc_inputs(feeds: dict[str, np.ndarray]) -> list:
    """tritonclient gRPC inputs for ``{name: array}``, the Triton type from each array's dtype."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, arr in feeds.items():
        dtype = next(k for k, v in TRITON_DTYPES.items() if v == arr.dtype)
        x = grpcclient.InferInput(name, list(arr.shape), dtype)
        x.set_data_from_numpy(np.ascontiguousarray(arr))
        inputs.append(x)
    return inputs


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def finish(
    name: str, out: str | Path, report: dict[str, Any], problems: Sequence[str], passed: str
) -> int:
    """A pass/fail benchmark's last step: write ``report`` to ``out``, then its verdict, the
    exit status: 1 with ``problems`` (on stderr), else 0 with the ``passed`` line."""
    print(f"wrote {write_json(out, report)}")
    if problems:
        print(f"{name} FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    print(f"{name} passed: {passed}")
    return 0


DEFAULT_REPOSITORY = Path("build/model_repository_cpu")  # what `make build` writes


def server_log(report: str | Path) -> Path:
    """Where a benchmark that starts tritonserver writes its log: next to the report
    (``outputs/soak.json`` -> ``outputs/soak_triton.log``), the folder created."""
    report = Path(report)
    report.parent.mkdir(parents=True, exist_ok=True)
    return report.with_name(report.stem + "_triton.log")


def benchmark_parser(
    name: str,
    doc: str | None,
    repository: str | None = None,
    *,
    steps: int | None = None,
    report: str | None = None,
) -> argparse.ArgumentParser:
    """A benchmark's argument parser: ``python -m benchmarks.<name>``, its module docstring
    as the help text, and, given ``repository`` (what the script does with one), a
    ``--repository`` option that defaults to the cpu build of ``make build``; given
    ``steps``, a ``--steps`` option (sampling steps per request) with that default; given
    ``report`` (a path), an ``--out`` option for the report file with that default."""
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if repository:
        p.add_argument(
            "--repository",
            type=Path,
            default=DEFAULT_REPOSITORY,
            help=f"{repository} (default: %(default)s)",
        )
    if steps is not None:
        p.add_argument(
            "--steps",
            type=int,
            default=steps,
            help="sampling steps per request (default: %(default)s)",
        )
    if report is not None:
        p.add_argument(
            "--out", type=Path, default=Path(report), help="report file (default: %(default)s)"
        )
    return p


def positive_ints(text: str) -> list[int]:
    """argparse type: comma-separated positive integers ("64,128,256")."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers: {text!r}")
    return values
