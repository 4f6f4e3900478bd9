"""Per-stage timings: vae_encoder, one unet step, vae_decoder and the whole cxr_sr.

    python -m benchmarks.stages --repository build/model_repository_cpu

Two paths, same inputs (real LR crops of the bundled radiograph), batch 1:

- ``server``: each model of the repository called over gRPC on the embedded tritonserver
  (or ``--url``); ``cxr_sr`` at several step counts. The BLS overhead per step is
  ``(full(k) - encoder - decoder) / k - unet``, and a least-squares line through
  full(k) gives the marginal cost of one more step.
- ``offline``: onnxruntime sessions in this process on the repository's own ``model.onnx``
  files (or ``--onnx-dir``), with the served models' default thread setting (idle threads
  busy-wait only inside a call; ``--spinning``), the full pipeline being encoder ->
  ``cxr_sr.sample`` over the unet session -> decoder with the repository's schedule and
  sampling defaults (the loop the sampler model runs).

Every timing is ``--warmup`` untimed calls then the median and 90th percentile of ``--runs``
timed calls, in ms. Writes ``outputs/bench_stages.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    TRITON_DTYPES,
    benchmark_parser,
    describe,
    device_info,
    grpc_inputs,
    lr_images,
    positive_ints,
    repository_sampling,
    server_log,
    server_version,
    software_versions,
    table,
    write_json,
)
from cxr_sr.builders.specs import ENSEMBLE, NETWORKS
from cxr_sr.ort_cpu import DEFAULT_SPIN_MODE, SPIN_MODES


def timeit(fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, float]:
    """``warmup`` untimed calls, then median / p90 / min of ``runs`` timed calls in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.asarray(times)
    return {
        "median_ms": float(np.median(t)),
        "p90_ms": float(np.percentile(t, 90)),
        "min_ms": float(t.min()),
        "runs": runs,
    }


def make_inputs(
    tensors: Sequence[tuple[str, type]],
    lr: np.ndarray,
    latent_shape: Sequence[int],
    num_train_timesteps: int = 1000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Plausible inputs by name: ``LR`` = ``lr``, ``timestep`` mid-schedule [N, 1], any other
    (a latent) ~ N(0, 1) of ``latent_shape`` (what the encoder gives for ``lr``: the sides
    are dynamic, so the graphs cannot say).

    ``tensors``: (name, numpy dtype); the batch is ``len(lr)``.
    """
    rng = np.random.default_rng(seed)
    n = len(lr)
    out = {}
    for name, dtype in tensors:
        if name == "LR":
            x = lr
        elif name == "timestep":
            x = np.full((n, 1), num_train_timesteps // 2)
        else:
            x = rng.standard_normal((n, *latent_shape[1:]))
        out[name] = np.ascontiguousarray(x, dtype=dtype)
    return out


def bls_overhead(stage: dict[str, dict[str, float]], full: dict[int, dict[str, float]]) -> dict:
    """Per-step BLS cost from medians: ``(full(k) - enc - dec) / k - unet`` and a line fit."""
    enc, unet, dec = (stage[n]["median_ms"] for n in NETWORKS)
    per_k = {k: (v["median_ms"] - enc - dec) / k - unet for k, v in full.items()}
    out: dict[str, Any] = {"per_steps": per_k}
    if len(full) >= 2:
        ks = np.array(sorted(full), dtype=float)
        ys = np.array([full[int(k)]["median_ms"] for k in ks])
        slope, intercept = np.polyfit(ks, ys, 1)
        out["marginal_step_ms"] = float(slope)
        out["fixed_ms"] = float(intercept)
        out["marginal_overhead_ms"] = float(slope - unet)
    return out


# ----------------------------------------------------------------- through the server


def _grpc_inputs(
    config: dict, lr: np.ndarray, latent_shape: Sequence[int], timesteps: int
) -> dict[str, np.ndarray]:
    tensors = [
        (t["name"], TRITON_DTYPES[t["data_type"].removeprefix("TYPE_")]) for t in config["input"]
    ]
    return make_inputs(tensors, lr, latent_shape, timesteps)


def server_timings(
    url: str, lr: np.ndarray, steps: Sequence[int], runs: int, warmup: int, seed: int = 0
) -> dict[str, Any]:
    """Stage and full-pipeline timings over gRPC at ``url``."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)

    def call(model: str, feeds: dict[str, np.ndarray], params: dict | None = None):
        inputs = grpc_inputs(feeds)
        return lambda: client.infer(model, inputs, parameters=params)

    stage = {}
    latent = call(NETWORKS[0], {"LR": lr})().as_numpy("z_lr").shape
    for name in NETWORKS:
        config = client.get_model_config(name, as_json=True)["config"]
        feeds = _grpc_inputs(config, lr, latent, 1000)
        stage[name] = timeit(call(name, feeds), runs, warmup)
        print(f"[server] {name}: {stage[name]['median_ms']:.1f} ms", flush=True)
    full = {}
    for k in steps:
        full[k] = timeit(call(ENSEMBLE, {"LR": lr}, {"steps": k, "seed": seed}), runs, warmup)
        print(f"[server] {ENSEMBLE} steps={k}: {full[k]['median_ms']:.1f} ms", flush=True)
    return {"stages": stage, "full": full, "bls": bls_overhead(stage, full)}


# ----------------------------------------------------------------- offline onnxruntime


def offline_timings(
    onnx_dir: Path,
    repository: Path | None,
    lr: np.ndarray,
    steps: Sequence[int],
    runs: int,
    warmup: int,
    seed: int = 0,
    threads: int = 0,
    spinning: str | bool = DEFAULT_SPIN_MODE,
) -> dict[str, Any]:
    """The same stages with onnxruntime sessions on ``onnx_dir/<network>.onnx``; the full
    pipeline is ``train.pipeline.OnnxPipeline`` (the one offline evaluation scores).

    ``spinning`` (``cxr_sr.ort_cpu.spin_mode``; ``run`` as the served models by default): idle
    intra-op threads busy-wait only inside a call; with ``on`` (onnxruntime's default) the
    pools of the idle sessions keep spinning and take CPU from the busy one on a shared
    2-core machine.
    """
    from cxr_sr.train.pipeline import ORT_DTYPES, OnnxPipeline

    pipe = OnnxPipeline(onnx_dir, threads=threads, spinning=spinning)
    sessions = pipe.sessions

    latent = pipe.encode_lr(lr).shape

    def feeds(name: str) -> dict[str, np.ndarray]:
        tensors = [(i.name, ORT_DTYPES[i.type]) for i in sessions[name].get_inputs()]
        return make_inputs(tensors, lr, latent)

    stage, inputs = {}, {name: feeds(name) for name in NETWORKS}
    for name in NETWORKS:
        sess, x = sessions[name], inputs[name]
        stage[name] = timeit(lambda s=sess, x=x: s.run(None, x), runs, warmup)
        print(f"[offline] {name}: {stage[name]['median_ms']:.1f} ms", flush=True)
    result: dict[str, Any] = {"stages": stage}
    try:
        schedule, defaults = repository_sampling(repository or Path("-"))
    except FileNotFoundError:
        print("[offline] no repository sampler folder: full pipeline skipped", flush=True)
        return result

    def pipeline(k: int) -> Callable[[], np.ndarray]:
        opts = defaults.replace(steps=k)
        return lambda: pipe.super_resolve(lr, schedule, opts, seed)

    full = {}
    for k in steps:
        full[k] = timeit(pipeline(k), runs, warmup)
        print(f"[offline] full steps={k}: {full[k]['median_ms']:.1f} ms", flush=True)
    result["full"] = full
    result["loop"] = bls_overhead(stage, full)  # python loop overhead (no BLS offline)
    return result


# ----------------------------------------------------------------- report


def stage_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows (stage, path, median, p90) for every measured stage and step count."""
    rows = []
    for path, res in results.items():
        for name, t in res.get("stages", {}).items():
            label = "unet (1 step)" if name == "unet" else name
            rows.append([label, path, t["median_ms"], t["p90_ms"]])
        for k, t in res.get("full", {}).items():
            rows.append([f"cxr_sr {k} steps", path, t["median_ms"], t["p90_ms"]])
    return rows


def overhead_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for path, res in results.items():
        over = res.get("bls") or res.get("loop")
        if not over:
            continue
        for k, v in over["per_steps"].items():
            rows.append([path, f"{k}", v])
        if "marginal_step_ms" in over:
            rows.append([path, "slope", over["marginal_overhead_ms"]])
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser(
        "stages",
        __doc__,
        "built repository: served for the server path, its sampler folder gives the "
        "schedule for the offline loop",
    )
    p.add_argument(
        "--onnx-dir",
        type=Path,
        default=None,
        help="ONNX files for the offline path (a builders ONNX folder or a repository; "
        "default: --repository's own model.onnx files, the graphs the server runs)",
    )
    p.add_argument("--url", default=None, help="gRPC host:port of a running server to time")
    p.add_argument(
        "--steps",
        type=positive_ints,
        default=[1, 2, 4, 8],
        help="step counts for the full cxr_sr timing (default: 1,2,4,8)",
    )
    p.add_argument("--runs", type=int, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs and sampling noise")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads offline (0 = onnxruntime's default, as served)",
    )
    p.add_argument(
        "--spinning",
        choices=SPIN_MODES,
        default=DEFAULT_SPIN_MODE,
        help="what the offline sessions' idle intra-op threads do: busy-wait only inside a call "
        "(run, the builder's default for the served models), sleep (off), or spin between calls "
        "too (on, onnxruntime's default: three spinning sessions slow each other on few cores)",
    )
    p.add_argument(
        "--only",
        choices=("server", "offline"),
        default=None,
        help="measure one path only (default: both)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/bench_stages.json"),
        help="JSON results (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be >= 1 and --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lr = lr_images(1, seed=args.seed)
    results: dict[str, dict[str, Any]] = {}
    triton = None
    try:
        if args.only != "offline":
            timing = (args.steps, args.runs, args.warmup, args.seed)
            if args.url:
                triton = server_version(args.url)
                results["server"] = server_timings(args.url, lr, *timing)
            else:
                from cxr_sr.builders.serve import TritonServer

                log = server_log(args.out)
                with TritonServer(args.repository, log_file=log) as server:
                    triton = server_version(server.grpc_url)
                    results["server"] = server_timings(server.grpc_url, lr, *timing)
        if args.only != "server":
            repo = args.repository if args.repository.is_dir() else None
            results["offline"] = offline_timings(
                args.onnx_dir or args.repository,
                repo,
                lr,
                args.steps,
                args.runs,
                args.warmup,
                args.seed,
                args.threads,
                spinning=args.spinning,
            )
    except (FileNotFoundError, RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    device, versions = device_info(), software_versions(triton)
    print()
    print(f"stage timings, batch 1, {args.warmup} warm-up + {args.runs} timed calls each")
    print(describe(device, versions))
    print(table(("stage", "path", "median ms", "p90 ms"), stage_rows(results)))
    rows = overhead_rows(results)
    if rows:
        print()
        print("per-step overhead beyond the unet call: (full(k) - enc - dec)/k - unet;")
        print("'slope' = least-squares marginal step cost - unet (server: BLS; offline: loop)")
        print(table(("path", "steps k", "overhead ms/step"), rows))
    write_json(
        args.out,
        {
            "benchmark": "stages",
            "repository": str(args.repository),
            "onnx_dir": str(args.onnx_dir or args.repository),
            "url": args.url,
            "batch": 1,
            "offline_spinning": args.spinning,
            "runs": args.runs,
            "warmup": args.warmup,
            "device": device,
            "versions": versions,
            "results": results,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
