"""The torch target on a GPU: served through Triton and in one process, side by side.

    python -m benchmarks.gpu --checkpoint weights/demo --out outputs/gpu.json

Builds the ``torch`` target for CUDA (``builders.build --target torch --torch-device cuda``:
fp16 networks as Python-backend PyTorch models, the sampler's loop on GPU tensors through
DLPack), serves it with the embedded tritonserver and measures, for the checkpoint's default
sampling (1 step):

- batch-1 latency through Triton (gRPC, ``SRClient``) at each LR side;
- throughput with perf_analyzer at concurrency 1..64 (LR 64 -> 256x256 out);
- the same ``builders.graphs.TorchStage`` modules in this process (``cxr_sr.sample`` on torch
  tensors), eager and with each network replayed as a CUDA graph, at batch 1 and at a large
  batch (the in-process ceiling);
- whether the served loop kept its tensors on the GPU (the sampler logs a warning the first
  time a tensor reaches it in host memory), and the served SR's largest difference from the
  in-process one for the same input and seed;
- the same difference per stage (``stage_max_abs``): each served model (``vae_encoder``,
  ``unet``, ``sampler``, ``vae_decoder``) called directly with the in-process pipeline's input
  for it, so a stage that computes something else is named alone.

``--device cpu`` runs the same script on the CPU, at small sizes, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    grpc_inputs,
    lr_crops,
    positive_ints,
    server_version,
    software_versions,
    table,
    write_json,
)
from benchmarks.perf import SHARED_MEMORY, PerfSettings, sweep
from cxr_sr import sample
from cxr_sr.builders.graphs import GraphedStage, TorchStage, vae_factor
from cxr_sr.builders.serve import TritonServer
from cxr_sr.client import SRClient
from cxr_sr.imaging import SCALE
from cxr_sr.noise import legacy_block, noise_keys
from cxr_sr.train.checkpoint import load

HOST_COPY_WARNING = "arrived in host memory"
# the sampler's warning names the tensor: "... on the GPU (input z_lr); copying it ..."
HOST_COPY_NAME = re.compile(HOST_COPY_WARNING + r".*?\((.+?)\); copying")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in ms, synchronised with the device."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class InProcess:
    """LR -> SR with the served modules in this process, the loop on torch tensors."""

    def __init__(self, ckpt, device: torch.device, half: bool, graphed: bool = False):
        self.ckpt, self.device = ckpt, device
        stages = {
            name: TorchStage(ckpt.vae, ckpt.denoiser, name, device, half)
            for name in ("vae_encoder", "unet", "vae_decoder")
        }
        self.stages = {n: GraphedStage(s) if graphed else s for n, s in stages.items()}
        self.noise_block = legacy_block(vae_factor(ckpt.vae))

    @torch.inference_mode()
    def sample(self, z_lr: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """The sampler's work: z_lr -> z, the checkpoint's sampling, noise keyed by ``seed``."""
        keys = noise_keys([seed], [len(z_lr)], [(0, 0)], self.noise_block)
        unet = self.stages["unet"]
        return sample(
            lambda x, t, c: unet(x, t.reshape(-1, 1), c),
            z_lr,
            self.ckpt.schedule,
            self.ckpt.sampling,
            keys,
        )

    @torch.inference_mode()
    def __call__(self, lr: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.stages["vae_decoder"](self.sample(self.stages["vae_encoder"](lr), seed), lr)


def _served(
    url: str, model: str, inputs: dict[str, np.ndarray], output: str, **params
) -> np.ndarray:
    """One direct request to one model of the repository (gRPC), its ``output`` as numpy."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    feeds = grpc_inputs({k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()})
    wanted = [grpcclient.InferRequestedOutput(output)]
    return client.infer(model, feeds, outputs=wanted, parameters=params or None).as_numpy(output)


@torch.inference_mode()
def stage_differences(url: str, pipe: InProcess, lr: np.ndarray, seed: int) -> dict[str, float]:
    """Largest |served - in-process| of each stage for the same input: every served model is
    called directly with the in-process pipeline's input for it, so each figure belongs to
    that stage alone, not to the stages before it; ``cxr_sr`` is the whole pipeline."""
    here = torch.from_numpy(lr).to(pipe.device)
    z_lr = pipe.stages["vae_encoder"](here)
    t = torch.full((len(lr), 1), float(pipe.ckpt.schedule.num_train_timesteps - 1))
    x_t = torch.randn(z_lr.shape, generator=torch.Generator().manual_seed(seed)).to(z_lr)
    z = pipe.sample(z_lr, seed)
    sr = pipe.stages["vae_decoder"](z, here).cpu().numpy()  # the whole pipeline's SR too
    host = {
        "z_lr": z_lr.cpu().numpy(),
        "x_t": x_t.cpu().numpy(),
        "t": t.numpy(),
        "z": z.cpu().numpy(),
    }
    pairs = {
        "vae_encoder": (
            _served(url, "vae_encoder", {"LR": lr}, "z_lr"),
            host["z_lr"],
        ),
        "unet": (
            _served(
                url,
                "unet",
                {"x_t": host["x_t"], "timestep": host["t"], "z_lr": host["z_lr"]},
                "model_output",
            ),
            pipe.stages["unet"](x_t, t.to(pipe.device), z_lr).cpu().numpy(),
        ),
        "sampler": (_served(url, "sampler", {"z_lr": host["z_lr"]}, "z", seed=seed), host["z"]),
        "vae_decoder": (_served(url, "vae_decoder", {"z": host["z"], "LR": lr}, "SR"), sr),
        "cxr_sr": (_served(url, "cxr_sr", {"LR": lr}, "SR", seed=seed), sr),
    }
    return {name: float(np.abs(a - b).max()) for name, (a, b) in pairs.items()}


# what benchmarks.gpu serves side by side: name -> builders.build options of the torch target
VARIANTS = {
    "models-dlpack": ["--torch-io", "dlpack"],  # separate models, GPU tensors via DLPack
    "models-host": ["--torch-io", "host"],  # separate models, every hop through host memory
    "fused": ["--torch-layout", "fused"],  # the sampler holds the three networks
    "fused-graphs": ["--torch-layout", "fused", "--cuda-graphs"],  # ... as CUDA graphs
    # two fused instances on the GPU: one's Python work overlaps the other's kernels
    "fused-graphs-x2": ["--torch-layout", "fused", "--cuda-graphs", "--instances", "2"],
    # no batcher delay: a lone request starts at once (batch-1 latency)
    "fused-graphs-nodelay": ["--torch-layout", "fused", "--cuda-graphs", "--queue-delay-us", "0"],
    # both: two instances, and a lone request starts at once
    "fused-graphs-x2-nodelay": [
        "--torch-layout",
        "fused",
        "--cuda-graphs",
        "--instances",
        "2",
        "--queue-delay-us",
        "0",
    ],
}


def build_repository(
    checkpoint: Path, out: Path, device: str, max_batch: int, options: Sequence[str] = ()
) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "cxr_sr.builders.build",
        "--checkpoint",
        str(checkpoint),
        "--target",
        "torch",
        "--torch-device",
        "cuda" if device == "cuda" else "cpu",
        "--max-batch",
        str(max_batch),
        *options,
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    return out


def in_process_rows(eager: InProcess, sides, batch, reps) -> list[dict[str, Any]]:
    """``eager`` timed at each side and at ``batch``, and on CUDA its CUDA-graph twin."""
    device = eager.device
    variants = {"eager": eager}
    if device.type == "cuda":
        variants["cuda graphs"] = InProcess(eager.ckpt, device, half=True, graphed=True)
    rows = []
    for name, pipe in variants.items():
        for side in sides:
            lr = torch.from_numpy(lr_crops(side, 1)).to(device)
            ms = timed(lambda pipe=pipe, lr=lr: pipe(lr), device, reps)
            rows.append({"path": f"in-process {name}", "lr_side": side, "batch": 1, "ms": ms})
        lr = torch.from_numpy(lr_crops(sides[0], 1)).to(device).repeat(batch, 1, 1, 1)
        ms = timed(lambda pipe=pipe, lr=lr: pipe(lr), device, max(3, reps // 4))
        rows.append({"path": f"in-process {name}", "lr_side": sides[0], "batch": batch, "ms": ms})
    for row in rows:
        row["images_per_s"] = row["batch"] / row["ms"] * 1e3
        row["mp_per_s"] = row["images_per_s"] * (SCALE * row["lr_side"]) ** 2 / 1e6
    return rows


def served_rows(server, sides, reps, variant: str) -> list[dict[str, Any]]:
    rows = []
    with SRClient(server.grpc_url, protocol="grpc") as client:
        for side in sides:
            lr = lr_crops(side, 1)
            ms = timed(lambda lr=lr: client.super_resolve(lr), torch.device("cpu"), reps)
            rows.append(
                {
                    "path": f"served {variant} (gRPC, batch 1)",
                    "lr_side": side,
                    "batch": 1,
                    "ms": ms,
                    "images_per_s": 1e3 / ms,
                    "mp_per_s": 1e3 / ms * (SCALE * side) ** 2 / 1e6,
                }
            )
    return rows


def serve_variant(args, reference: InProcess, name: str, tmp: Path) -> dict[str, Any]:
    """One served variant: batch-1 latency, its SR against the in-process ``reference`` (and
    against itself, asked twice), each stage's difference (separate models only),
    perf_analyzer."""
    repo = build_repository(
        args.checkpoint, tmp / name, args.device, args.max_batch, VARIANTS[name]
    )
    log = tmp / f"triton_{name}.log"
    result: dict[str, Any] = {"variant": name}
    with TritonServer(repo, log_file=log) as server:
        result["rows"] = served_rows(server, args.sides, args.reps, name)
        lr = lr_crops(args.sides[0], 1)
        with SRClient(server.grpc_url, protocol="grpc") as client:
            served = client.super_resolve(lr, seed=3)
            again = client.super_resolve(lr, seed=3)
        local = reference(torch.from_numpy(lr).to(reference.device), seed=3).cpu().numpy()
        result["served_vs_in_process_max_abs"] = float(np.abs(served - local).max())
        result["served_repeat_max_abs"] = float(np.abs(served - again).max())
        if name.startswith("models"):  # which stage differs, each with the same inputs
            result["stage_max_abs"] = stage_differences(server.grpc_url, reference, lr, seed=3)
        perf = []
        if args.concurrency and (args.perf_variants is None or name in args.perf_variants):
            settings = PerfSettings(
                measurement_ms=args.measurement_ms,
                max_trials=args.max_trials,
                shared_memory=args.perf_shared_memory,
            )
            perf = sweep(server.grpc_url, args.concurrency, settings, sizes=[args.sides[0]])
        result["perf"] = [
            {
                "variant": name,
                "concurrency": r.concurrency,
                "lr_side": r.lr_side,
                "images_per_s": r.throughput,
                "p50_ms": r.p50_ms,
                "p99_ms": r.p99_ms,
                "failed_requests": r.failed_requests,
                "stable": r.stable,
                "request_count": r.request_count,  # None: a time window
                "error": r.error,
                "models": r.models,  # per model: mean batch formed, queue/compute ms
            }
            for r in perf
        ]
        result["triton"] = server_version(server.grpc_url)
    text = log.read_text(errors="replace") if log.is_file() else ""
    result["gpu_resident_loop"] = HOST_COPY_WARNING not in text
    result["host_memory_tensors"] = sorted(set(HOST_COPY_NAME.findall(text)))
    return result


def _window(row: dict[str, Any]) -> str:
    """How perf_analyzer measured a level: a settled time window, or a fixed request count
    (after an unsettled search: "unstable")."""
    if row.get("request_count") is None:
        return "time"
    return f"{row['request_count']} requests" + ("" if row.get("stable", True) else ", unstable")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser("gpu", __doc__)
    p.add_argument("--checkpoint", type=Path, default=Path("weights/demo"), help="checkpoint")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a small smoke test"
    )
    p.add_argument(
        "--sides", type=positive_ints, default=[64, 128, 256], help="LR sides (batch-1 rows)"
    )
    p.add_argument("--batch", type=int, default=64, help="in-process large batch (LR 64)")
    p.add_argument("--reps", type=int, default=50, help="timed repetitions per case")
    p.add_argument(
        "--variants",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        # the separate models, one fused instance, and the two-instance build with and without
        # the batcher's delay (the README recommends the latter: on an H100 it had the lowest
        # batch-1 latency and the most images/s at concurrency 64)
        default=["models-dlpack", "fused-graphs", "fused-graphs-x2", "fused-graphs-x2-nodelay"],
        help=f"served variants, comma-separated, of {', '.join(VARIANTS)} (fused-graphs*: "
        "CUDA only; default: %(default)s)",
    )
    p.add_argument(
        "--perf-variants",
        type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
        default=None,
        help="the variants perf_analyzer runs against (default: every served variant)",
    )
    p.add_argument(
        "--concurrency",
        type=lambda text: positive_ints(text) if text.strip() else [],
        default=[1, 4, 16, 64],
        help="perf_analyzer levels, comma-separated ('': no perf_analyzer run)",
    )
    p.add_argument("--max-batch", type=int, default=64, help="the served models' max batch")
    p.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer window")
    p.add_argument("--max-trials", type=int, default=4, help="perf_analyzer windows per level")
    p.add_argument(
        "--perf-shared-memory",
        choices=SHARED_MEMORY,
        default="none",
        help="perf_analyzer's inputs and outputs: gRPC messages (none) or system shared memory",
    )
    p.add_argument("--out", type=Path, default=Path("outputs/gpu.json"), help="JSON report")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants + (args.perf_variants or []) if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.device == "cpu":
        args.variants = [v for v in args.variants if not v.startswith("fused-graphs")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to torch (use --device cpu for a smoke test)")
        return 2
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    ckpt = load(args.checkpoint)
    print("[gpu] in-process", flush=True)
    reference = InProcess(ckpt, device, device.type == "cuda")  # eager: what each SR is held to
    rows = in_process_rows(reference, args.sides, args.batch, args.reps)
    for row in rows:  # as they come, so a run cut short still leaves them in its log
        print(f"[gpu] {json.dumps(row)}", flush=True)
    variants: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="cxr-gpu-") as tmp:
        for name in args.variants:
            print(f"[gpu] served: {name}", flush=True)
            try:  # one variant failing must not cost the others' figures
                variants.append(serve_variant(args, reference, name, Path(tmp)))
                print(f"[gpu] {name}: {json.dumps(variants[-1], default=str)}", flush=True)
            except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
                log = Path(tmp) / f"triton_{name}.log"
                text = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
                print(f"[gpu] {name} failed: {err}\n{text}", flush=True)
                variants.append({"variant": name, "error": str(err)[:2000]})
    triton = next((v["triton"] for v in variants if "triton" in v), None)
    versions = software_versions(triton=triton)
    versions["torch"] = torch.__version__
    rows += [r for v in variants for r in v.get("rows", [])]
    perf_rows = [r for v in variants for r in v.get("perf", [])]
    print(describe(device_info(), versions))
    print(
        table(
            ["path", "LR", "batch", "ms", "images/s", "output MP/s"],
            [
                [
                    r["path"],
                    r["lr_side"],
                    r["batch"],
                    f"{r['ms']:.2f}",
                    f"{r['images_per_s']:.1f}",
                    f"{r['mp_per_s']:.2f}",
                ]
                for r in rows
            ],
        )
    )
    if perf_rows:
        print(
            table(
                [
                    "variant",
                    "concurrency",
                    "LR",
                    "images/s",
                    "p50 ms",
                    "p99 ms",
                    "failed",
                    "window",
                ],
                [
                    [
                        r["variant"],
                        r["concurrency"],
                        r["lr_side"],
                        "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}",
                        "-" if r["p50_ms"] is None else f"{r['p50_ms']:.2f}",
                        "-" if r["p99_ms"] is None else f"{r['p99_ms']:.2f}",
                        r["failed_requests"],
                        _window(r),
                    ]
                    for r in perf_rows
                ],
            )
        )
    for v in variants:
        if "error" in v:
            print(f"{v['variant']}: failed: {v['error'][:300]}")
            continue
        stages = v.get("stage_max_abs")
        print(
            f"{v['variant']}: GPU-resident loop {v['gpu_resident_loop']}"
            + (
                f" (in host memory: {', '.join(v['host_memory_tensors'])})"
                if v.get("host_memory_tensors")
                else ""
            )
            + "; served vs in-process "
            f"max |diff| {v['served_vs_in_process_max_abs']:.2e}; served twice "
            f"{v['served_repeat_max_abs']:.2e}"
            + ("" if not stages else "; per stage: ")
            + ", ".join(f"{k} {x:.2e}" for k, x in (stages or {}).items())
        )
    report = {
        "device": device_info(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        "perf": perf_rows,
        "variants": [{k: x for k, x in v.items() if k not in ("rows", "perf")} for v in variants],
    }
    write_json(args.out, report)
    print(f"[gpu] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
