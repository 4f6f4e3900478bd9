"""Assemble a Triton model repository from a checkpoint folder.

    python -m cxr_sr.builders.build --checkpoint weights/demo --target cpu \
        --out build/model_repository

Stages, each cached by a key of its inputs (re-running with nothing changed does nothing):
  1. ONNX export of vae_encoder, unet, vae_decoder with dynamic batch and sides
     (+ onnxruntime-vs-torch max abs diff at several LR sizes)
  2. TensorRT plan of the UNet (``--target gpu``, where TensorRT is importable), its profile
     over batch and sides
  3. the repository: configs from the specs, model.py sources from ``model_repository/``,
     the schedule and sampling defaults for the sampler

Served sizes: LR sides from 16 to ``--max-side`` (default 256, i.e. 1024x1024 out). A network
with attention over a whole feature map costs memory quadratic in pixels; without
``--max-side`` the build lowers the default (in steps of 16) until one image's largest
attention fits ``--attention-budget-mib`` (2 GiB) for all heads together and an eighth of it
(256 MiB) for a single head, and says so. Measured on onnxruntime CPU: the first-version VAE's
one-head mid-block attention (1 GiB at LR 128) took a 9 GB process and was OOM-killed; a
UNet mid-block attention of 16 heads (1 GiB in all at LR 256) a 2.4 GB process.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import sys
import time
from pathlib import Path

from cxr_sr.builders import quantize as Q
from cxr_sr.builders import specs as S
from cxr_sr.builders import trt
from cxr_sr.builders.triton_config import (
    CPU_LAYOUTS,
    DEFAULT_LIMITS,
    GPU_LOOPS,
    PRECISIONS,
    TARGETS,
    TORCH_DEVICES,
    TORCH_IO,
    TORCH_LAYOUTS,
    ServingLimits,
    default_queue_delay_us,
    ensemble_config,
    network_config,
    sampler_config,
    step_queue_delay_us,
    write_config,
)
from cxr_sr.client.triton import ModelIdentity
from cxr_sr.model_repository import SOURCES
from cxr_sr.ort_cpu import DEFAULT_SPIN_MODE, SPIN_MODES, lane_count

# 2: dynamic sides, padding encoder, cropping decoder; 3: headwise attention; 4: bicubic as a
# convolution, fused-attention variants
CACHE_VERSION = 4
# a network with attention layers is also exported with onnxruntime's fused attention, as
# <name>.fused.onnx: the cpu target serves that one (builders.graphs.FusedAttention)
FUSED = ".fused"
ATTENTION_BUDGET_MIB = 2048  # per image, all heads; one head: an eighth (HEAD_SHARE)
HEAD_SHARE = 8


def _digest(folder: Path, extra: dict) -> str:
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **extra}, sort_keys=True).encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def model_identity(checkpoint: Path) -> ModelIdentity:
    """The checkpoint's identity as the ensemble publishes it: its name (``cxr_sr.json``'s
    ``name``, else the folder's), its version (the recorded ``version``, else this package's)
    and the SHA-256 over every file but the model card and other documentation, each
    hashed as its relative path then its bytes, in sorted path order (stable across copies)."""
    meta = json.loads((checkpoint / "cxr_sr.json").read_text())
    h = hashlib.sha256()
    files = sorted(
        p
        for p in checkpoint.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in (".md", ".txt")
    )
    for path in files:
        name = path.relative_to(checkpoint).as_posix()
        h.update(f"{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    version = meta.get("version") or importlib.metadata.version("cxr-sr")
    return ModelIdentity(str(meta.get("name") or checkpoint.name), str(version), h.hexdigest())


def served_geometry(
    ckpt, max_side: int | None = None, budget_mib: float = ATTENTION_BUDGET_MIB
) -> tuple[S.Geometry, str | None]:
    """The LR sizes to serve for a checkpoint, and a note when the build had to say something.

    ``max_side`` None: :data:`specs.MAX_SIDE`, lowered in steps of 16 until one image's
    largest attention fits ``budget_mib`` (all heads) and ``budget_mib / HEAD_SHARE`` (one
    head); a given ``max_side`` is kept, with a warning when it does not fit.
    """
    # torch (through builders.graphs) is imported where a checkpoint is loaded, as in
    # export_all, so that assembling configs and --help do not need it
    from cxr_sr.builders.graphs import attention_bytes, lr_multiple, unet_factor, vae_factor

    f = vae_factor(ckpt.vae)
    m = lr_multiple(f, unet_factor(ckpt.denoiser))
    min_side = max(S.MIN_SIDE, m)
    limits = {False: budget_mib, True: budget_mib / HEAD_SHARE}  # per_head -> MiB
    at_max = {h: attention_bytes(ckpt.vae, ckpt.denoiser, S.MAX_SIDE, per_head=h) for h in limits}

    def excess(side: int) -> str | None:
        """What of one image's attention exceeds the budget at ``side`` (None: nothing)."""
        for per_head, budget in limits.items():
            for name, nbytes in at_max[per_head].items():
                mib = nbytes * (side / S.MAX_SIDE) ** 4 / 2**20
                if mib > budget:
                    what = "one head of the" if per_head else "the"
                    return f"{what} {name}'s attention needs {mib:,.0f} MiB (budget {budget:g})"
        return None

    note = None
    if max_side is None:
        side = S.MAX_SIDE
        while side - 16 >= min_side and excess(side):
            side -= 16
        if side != S.MAX_SIDE:
            note = (
                f"max LR side {side}, not {S.MAX_SIDE}: at LR {S.MAX_SIDE} {excess(S.MAX_SIDE)} "
                "per image (--max-side overrides, --attention-budget-mib sets the budget)"
            )
    else:
        side = max_side
        if excess(side):
            note = (
                f"warning: at LR {side} {excess(side)} per image: large requests may exhaust memory"
            )
    geometry = S.Geometry(f, m, min_side, side, min(max(min_side, S.OPT_SIDE), side))
    return geometry, note


def checkpoint_specs(
    ckpt, max_batch: int, *, max_side: int | None = None, budget_mib: float = ATTENTION_BUDGET_MIB
) -> dict[str, S.NetworkSpec]:
    """The network specs of a loaded checkpoint at the served sizes (printed)."""
    geometry, note = served_geometry(ckpt, max_side, budget_mib)
    if note:
        print(f"[geometry] {note}")
    print(
        f"[geometry] LR sides {geometry.min_side}-{geometry.max_side} (padded inside to "
        f"multiples of {geometry.multiple}), VAE factor {geometry.vae_factor}"
    )
    return S.network_specs(ckpt.latent_shape[0], geometry, max_batch)


def export_all(
    checkpoint: Path,
    onnx_dir: Path,
    max_batch: int,
    *,
    max_side: int | None = None,
    budget_mib: float = ATTENTION_BUDGET_MIB,
    dynamo: bool = False,
    force: bool = False,
) -> tuple[dict[str, S.NetworkSpec], dict[str, Path]]:
    """Stage 1: ONNX files for every network, reused when the checkpoint is unchanged (the
    files do not depend on the served sizes, only the specs' profiles and configs do)."""
    from cxr_sr.builders.export import check_onnx, check_sizes, export_onnx
    from cxr_sr.builders.graphs import attention_layers, graphs
    from cxr_sr.train.checkpoint import load

    key = _digest(checkpoint, {"max_batch": max_batch, "dynamo": dynamo})
    stamp = onnx_dir / "export.json"
    ckpt = load(checkpoint)
    specs = checkpoint_specs(ckpt, max_batch, max_side=max_side, budget_mib=budget_mib)
    # (file key, network, attention): every network portable; with attention, also fused
    # (not with dynamo: the fused node is a TorchScript-exporter symbolic)
    modules = graphs(ckpt.vae, ckpt.denoiser)
    files = [(name, name, "headwise") for name in S.NETWORKS] + [
        (name + FUSED, name, "fused")
        for name in S.NETWORKS
        if not dynamo and attention_layers(modules[name])
    ]
    paths = {k: onnx_dir / f"{k}.onnx" for k, _, _ in files}
    cached = stamp.is_file() and json.loads(stamp.read_text()).get("key") == key
    if cached and not force and all(p.is_file() for p in paths.values()):
        print(f"[export] up to date ({onnx_dir})")
        return specs, paths
    for stale in onnx_dir.glob(f"*{FUSED}.onnx"):
        stale.unlink()  # a fused variant of an earlier checkpoint must not be served
    rows = []
    for key_name, name, attention in files:
        t0 = time.perf_counter()
        export_onnx(ckpt, specs[name], paths[key_name], dynamo=dynamo, attention=attention)
        diff = check_onnx(ckpt, specs[name], paths[key_name])
        size = paths[key_name].stat().st_size / 2**20
        rows.append((key_name, size, diff, time.perf_counter() - t0))
    print(
        f"{'network':<12} {'MiB':>6} {'max |onnx - torch|':>19} {'s':>6}  (LR sizes checked:"
        f" {', '.join(f'{b}x{h}x{w}' for b, (h, w) in check_sizes(specs['unet']))})"
    )
    for name, mib, diff, sec in rows:
        print(f"{name:<12} {mib:6.2f} {diff:19.2e} {sec:6.1f}")
    stamp.write_text(
        json.dumps(
            {"key": key, "checkpoint": checkpoint.name, "max_abs_diff": {r[0]: r[2] for r in rows}},
            indent=2,
        )
        + "\n"
    )
    return specs, paths


def _install(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        shutil.copyfile(src, dst)


def _install_tree(src: Path, dst: Path) -> None:
    """Copy a folder's files (changed ones only); files no longer in ``src`` are removed."""
    wanted = {p.relative_to(src) for p in src.rglob("*") if p.is_file()}
    for rel in sorted(wanted):
        _install(src / rel, dst / rel)
    for path in sorted(dst.rglob("*"), reverse=True) if dst.is_dir() else ():
        if path.is_file() and path.relative_to(dst) not in wanted:
            path.unlink()


def assemble(
    checkpoint: Path,
    out: Path,
    target: str,
    specs: dict[str, S.NetworkSpec],
    onnx: dict[str, Path],
    *,
    instances: int = 1,
    engine: str = "auto",
    limits: ServingLimits = DEFAULT_LIMITS,
    torch_device: str = "auto",
    precision: str = "fp16",
    torch_io: str = "dlpack",
    ort_arena: bool = True,
    cpu_lanes: str = "auto",
    cpu_spinning: str = DEFAULT_SPIN_MODE,
    int8_unet: bool = False,
    torch_layout: str = "models",
    cuda_graphs: bool = False,
    queue_delay_us: int | None = None,
    cpu_layout: str = "models",
    gpu_loop: str = "torch",
    cpu_rate_limit: bool | None = None,
) -> Path:
    """Stage 2-3: write the Triton repository for ``target`` into ``out`` (``torch``: the
    checkpoint itself goes next to each network's ``model.py``; ``onnx`` is not used;
    ``int8_unet``: the cpu target serves ``onnx["unet.int8"]``; ``torch_layout`` fused: the
    sampler holds the networks and ``cxr_sr`` has it as its only step; ``cpu_layout`` chain:
    the sampler takes LR and calls the three networks through BLS, and ``cxr_sr`` has it as its
    only step; ``gpu_loop`` torch: the gpu target's sampler keeps its latents on the GPU;
    ``cpu_rate_limit``: the cpu target's networks run one at a time, Triton's rate limiter;
    None: with one instance per model, not with more, whose point is to overlap them)."""
    from cxr_sr import Schedule

    if torch_layout not in TORCH_LAYOUTS:
        raise ValueError(f"torch_layout must be one of {TORCH_LAYOUTS}, got {torch_layout!r}")
    if gpu_loop not in GPU_LOOPS:
        raise ValueError(f"gpu_loop must be one of {GPU_LOOPS}, got {gpu_loop!r}")
    if cpu_layout not in CPU_LAYOUTS:
        raise ValueError(f"cpu_layout must be one of {CPU_LAYOUTS}, got {cpu_layout!r}")
    fused = target == "torch" and torch_layout == "fused"
    # more instances are there to run at once, so by default they are not rate-limited
    rate_limit = target == "cpu" and (instances == 1 if cpu_rate_limit is None else cpu_rate_limit)
    chain = target == "cpu" and cpu_layout == "chain"
    if queue_delay_us is None:
        queue_delay_us = default_queue_delay_us(target, cpu_layout)
    meta = json.loads((checkpoint / "cxr_sr.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for stale in S.NETWORKS if fused else ():  # a rebuild into a models-layout folder
        shutil.rmtree(out / stale, ignore_errors=True)
    for name in S.NETWORKS if not fused else ():
        version = out / name / "1"
        version.mkdir(parents=True, exist_ok=True)
        label = None  # extra config parameters
        if target == "gpu" and name == "unet":
            plan = version / "model.plan"
            if engine == "skip" or (engine == "auto" and trt.tensorrt_version() is None):
                print(
                    f"[trt] TensorRT not importable: wrote the config only; build {plan} "
                    "inside the NGC container (docker/README.md)"
                )
            else:
                trt.build_engine(onnx[name], specs[name], plan)
        elif target == "gpu":
            _install(onnx[name], version / "model.onnx")
        elif target == "torch":
            _install_tree(checkpoint, version / "checkpoint")
            _install(SOURCES / "torch_python" / "model.py", version / "model.py")
        else:  # cpu: onnxruntime, so the fused-attention variant where there is one
            int8 = int8_unet and name == "unet"
            graph = onnx[name + Q.INT8] if int8 else (onnx.get(name + FUSED) or onnx[name])
            _install(graph, version / "model.onnx")
            _install(SOURCES / "onnx_python" / "model.py", version / "model.py")
            label = {"precision": "int8" if int8 else "fp32"}  # what the served graph is
        config = network_config(
            specs[name],
            target,
            instances=instances,
            queue_delay_us=queue_delay_us,
            chained=chain,
            limits=limits,
            torch_device=torch_device,
            precision=precision,
            torch_io=torch_io,
            ort_arena=ort_arena,
            cpu_lanes=cpu_lanes,
            cpu_spinning=cpu_spinning,
            parameters=label,
            rate_limited=rate_limit,
        )
        write_config(config, out / name)

    sampler = out / S.SAMPLER / "1"
    _install(SOURCES / S.SAMPLER / "1" / "model.py", sampler / "model.py")
    Schedule.load(checkpoint / "scheduler").save(sampler)
    (sampler / "sampling.json").write_text(json.dumps(meta["sampling"], indent=2) + "\n")
    # on the torch target the loop runs on torch tensors where the networks are (DLPack), or
    # on the host with io "host" (still torch: DLPack in host memory, not the numpy bridge)
    loop = "numpy"
    if target == "torch":
        on_host = torch_io == "host" and not fused  # fused: nothing crosses processes
        loop = "torch-cpu" if on_host else f"torch-{torch_device}"
    elif target == "gpu" and gpu_loop == "torch":  # the TensorRT UNet's outputs stay on the GPU
        loop = "torch-cuda"
    if fused:
        _install_tree(checkpoint, sampler / "checkpoint")
    else:  # a rebuild into a fused-layout folder
        shutil.rmtree(sampler / "checkpoint", ignore_errors=True)
    # the sampler takes clients' requests when fused or chained, else the encoder step's
    step = not (fused or chain)
    config = sampler_config(
        specs["unet"],
        instances=instances,
        queue_delay_us=step_queue_delay_us(target, queue_delay_us) if step else queue_delay_us,
        limits=limits,
        loop_device=loop,
        fused=specs if fused else None,
        chain=specs if chain else None,
        precision=precision,
        cuda_graphs=cuda_graphs,
    )
    write_config(config, out / S.SAMPLER)

    (out / S.ENSEMBLE / "1").mkdir(parents=True, exist_ok=True)
    identity = model_identity(checkpoint).parameters()
    write_config(
        ensemble_config(specs, identity, limits, sampler_only=fused or chain), out / S.ENSEMBLE
    )
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=Path("weights/demo"),
        help="checkpoint folder written by cxr_sr.train.loop (default: %(default)s)",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="cpu",
        help="cpu: Python-backend onnxruntime models (the embedded tritonserver); "
        "gpu: TensorRT UNet + onnxruntime_onnx VAE (NGC tritonserver); "
        "torch: Python-backend PyTorch models, fp16 on CUDA (the fallback where no TensorRT "
        "plan exists; also runs on the CPU)",
    )
    p.add_argument(
        "--torch-device",
        choices=TORCH_DEVICES,
        default="auto",
        help="--target torch: cuda = KIND_GPU instances and a GPU-resident sampler loop; "
        "auto = CUDA where torch sees a GPU at load time, else CPU; cpu (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp16",
        help="--target torch on CUDA: network precision (default: %(default)s; the decoder's "
        "bicubic base and sum stay fp32)",
    )
    p.add_argument(
        "--int8-unet",
        action="store_true",
        help="cpu target: serve the UNet in int8 (onnxruntime static quantization, QDQ, "
        "per-channel weights; first and last layers float32), calibrated on what the float "
        "pipeline feeds it while upscaling --calibration-images. Measured on 2 Xeon cores and "
        "20 held-out NIH radiographs: the pipeline 1.16-1.26x faster, PSNR -0.02 dB, SSIM "
        "unchanged (README, Results); off by default, as any change of weights should be a "
        "choice (check it on your own images with benchmarks.quantize --eval-images)",
    )
    p.add_argument(
        "--calibration-images",
        nargs="+",
        default=(),
        metavar="PATH",
        help="--int8-unet: images (files or folders, PNG/JPEG/TIFF/DICOM) whose LR 64 and 128 "
        "crops calibrate the int8 ranges (default: the bundled chest radiograph); your own "
        "radiographs fit your data best",
    )
    p.add_argument(
        "--ort-arena",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cpu target: onnxruntime's CPU memory arena (default on). Each model process then "
        "keeps the peak of the largest request it has served, which --max-side bounds (demo "
        "repository after an LR 256 image: unet ~0.35 GB, vae_decoder ~0.65 GB); "
        "--no-ort-arena returns to ~0.1-0.2 GB between requests but maps its memory afresh "
        "for every call: LR 256 took 1.6-2.2x as long (README, Memory)",
    )
    p.add_argument(
        "--cpu-spinning",
        choices=SPIN_MODES,
        default=DEFAULT_SPIN_MODE,
        help="cpu target: what a network's idle onnxruntime threads do. run (default): "
        "busy-wait between the operators of a call, sleep once it returns; off: always sleep; "
        "on: onnxruntime's default, busy-wait between calls too, which lets the three model "
        "processes take CPU from each other (CXR_ORT_SPINNING overrides it when the server "
        "starts). On 2 cores run served one client 4-6%% faster than off and four ~1.5%% "
        "slower (README, Served vs in-process)",
    )
    p.add_argument(
        "--cpu-lanes",
        default="auto",
        metavar="auto|N",
        help="cpu target: a dynamic batch of several images runs as N parallel onnxruntime "
        "calls with 1/N of the threads each, the images left over after the last full group "
        "with all of them; auto = 2 where a model has 2 or more threads (default: "
        "%(default)s; 1 turns it off; CXR_ORT_LANES overrides it when the server starts). "
        "On 2 cores two calls of one thread each give 1.2-1.3x the images per second of one "
        "call of two threads (README, Served vs in-process)",
    )
    p.add_argument(
        "--torch-io",
        choices=TORCH_IO,
        default="dlpack",
        help="--target torch: dlpack = tensors stay where they are (GPU memory on the GPU, the "
        "sampler's loop there too); host = every hop through host memory, for Python "
        "backends that cannot share GPU memory between processes (default: %(default)s)",
    )
    p.add_argument(
        "--queue-delay-us",
        type=int,
        default=None,
        help="how long a dynamic batcher that clients' requests reach holds a request to fill "
        "a batch when fewer than half --max-batch are queued: vae_encoder's (default 2000), "
        "or the sampler's where it takes the client's LR itself (the torch target's fused "
        "layout, default 2000; the cpu target's chain layout, default 1000). In the models "
        "layout the sampler and vae_decoder, fed "
        "by the step before, wait as long on the GPU targets and at most 500 on the cpu "
        "target; the models the sampler calls wait 0, its batches come whole. A lone request "
        "waits at each batcher: 0 for the lowest batch-1 latency, more for fuller batches "
        "when clients send at once",
    )
    p.add_argument(
        "--cpu-layout",
        choices=CPU_LAYOUTS,
        default="models",
        help="--target cpu: models = the cxr_sr ensemble chains vae_encoder, the sampler and "
        "vae_decoder, each batching (and waiting --queue-delay-us) on its own; chain = the "
        "sampler takes the client's LR and calls vae_encoder, unet (per step) and vae_decoder "
        "through BLS, so a batch forms once and a lone request waits once (lower batch-1 "
        "latency), but under sustained load with the queue limits on some requests waited "
        "~0.5 s in Triton's batcher (none with --max-queue-size 0 --queue-timeout-s 0; "
        "README, Served vs in-process; default: %(default)s)",
    )
    p.add_argument(
        "--cpu-rate-limit",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cpu target: one network model executes at a time (Triton's rate limiter: each "
        "network instance takes the one unit of a resource 'cpu'; builders.serve then starts "
        "tritonserver with --rate-limit=execution_count, which your own tritonserver command "
        "must add too). Otherwise two networks can run at once, each with its own onnxruntime "
        "threads on the same cores. Measured on 2 cores: the same with 1-4 clients, 2-7%% more "
        "images/s with 8-16, and under a flood no encoder work thrown away (README, Served vs "
        "in-process). Default: on with --instances 1, off with more (more instances are there "
        "to run at once)",
    )
    p.add_argument(
        "--gpu-loop",
        choices=GPU_LOOPS,
        default="torch",
        help="--target gpu: where the sampler's timestep loop keeps the latents. torch "
        "(default): on the GPU between steps, as torch CUDA tensors exchanged with the TensorRT "
        "UNet through DLPack, its outputs asked for in GPU memory, so no step copies to the "
        "host (the runtime needs torch: docker/Dockerfile installs the [torch] extra); numpy: "
        "copied to the host and back at every step, for a runtime without torch",
    )
    p.add_argument(
        "--torch-layout",
        choices=TORCH_LAYOUTS,
        default="models",
        help="--target torch: models = vae_encoder, the BLS sampler and vae_decoder as separate "
        "models, unet called per step; fused = the sampler holds all three networks, so a "
        "request crosses one Python process instead of five plus two per step (README, "
        '"GPU"); fewer models to scale separately (default: %(default)s)',
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="--target torch --torch-layout fused on CUDA: replay each network as a CUDA graph "
        "per input shape (captured on first use; up to 64 shapes per network)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="repository folder (default: build/model_repository_<target>)",
    )
    p.add_argument(
        "--onnx-dir",
        type=Path,
        default=Path("build/onnx"),
        help="where ONNX exports are cached (default: %(default)s)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="max_batch_size of every model and the TensorRT max profile",
    )
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help=f"largest LR side served (output 4x); default {S.MAX_SIDE}, lowered for networks "
        "whose whole-feature-map attention would not fit --attention-budget-mib",
    )
    p.add_argument(
        "--attention-budget-mib",
        type=float,
        default=ATTENTION_BUDGET_MIB,
        help="attention memory per image the default --max-side allows: all heads together, "
        f"1/{HEAD_SHARE} of it for one head (default: %(default)s)",
    )
    p.add_argument(
        "--instances",
        type=int,
        default=1,
        help="instances per model (default: %(default)s). On the cpu target 2 let another "
        "request's stage use the cores while one waits: -8%% to +33%% images/s at 4-8 clients "
        "at LR 64-128 on 2 cores over three runs, the same latency at 1 client, twice the "
        "network processes' memory. On an H100 2 fused torch instances with CUDA graphs "
        "overlap one's Python work with the other's kernels: ~900 -> 1,011-1,286 images/s at "
        "16-64 clients. "
        "The inference probe reaches one instance per call: with 2, a killed sampler stub "
        "left it passing while the requests routed to that instance failed; the serve "
        "wrapper's watchdog also counts the stub processes and catches that, a bare exec "
        "probe (builders.probe) does not",
    )
    limits = p.add_argument_group(
        "limits", "what one client can ask of the server (published in the ensemble's config)"
    )
    limits.add_argument(
        "--max-steps",
        type=int,
        default=DEFAULT_LIMITS.max_steps,
        help="sampling steps per request; more gets INVALID_ARG (default: %(default)s)",
    )
    limits.add_argument(
        "--max-request-pixels",
        type=int,
        default=None,
        help="LR pixels per request (N x H x W, sides padded to the encoder's multiple); "
        "default: 4 images of the largest side",
    )
    limits.add_argument(
        "--max-queue-size",
        type=int,
        default=DEFAULT_LIMITS.max_queue_size,
        help="requests waiting in the queue of each model where requests are admitted, "
        "before the UNet loop (vae_encoder and the sampler; the sampler alone in the chain "
        "layout); more are rejected at once; 0: no limit. With this and --queue-timeout-s "
        "both 0 no model gets a queue policy, which lets Triton 2.51's batcher form the "
        "next batch while an instance is busy: no requests held ~0.5 s under sustained "
        "load, but no rejection of a flood either "
        "(README, Served vs in-process; default: %(default)s)",
    )
    limits.add_argument(
        "--queue-timeout-s",
        type=float,
        default=DEFAULT_LIMITS.queue_timeout_s,
        help="a request waiting longer in such a queue is rejected; 0: no timeout "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--engine",
        choices=("auto", "build", "skip"),
        default="auto",
        help="TensorRT plan for --target gpu: build it, skip it, or build only "
        "where TensorRT is importable (auto)",
    )
    p.add_argument(
        "--dynamo",
        action="store_true",
        help="use torch's dynamo ONNX exporter instead of the TorchScript one",
    )
    p.add_argument("--force", action="store_true", help="re-export even if cached")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.checkpoint / "cxr_sr.json").is_file():
        print(
            f"error: {args.checkpoint} is not a checkpoint folder (no cxr_sr.json); "
            "train one with `python -m cxr_sr.train.loop` or run `make weights`",
            file=sys.stderr,
        )
        return 2
    if not 1 <= args.max_batch <= 256:
        print(f"error: --max-batch must be in [1, 256], got {args.max_batch}", file=sys.stderr)
        return 2
    if not 1 <= args.instances <= 64:
        print(f"error: --instances must be in [1, 64], got {args.instances}", file=sys.stderr)
        return 2
    if args.max_side is not None and not S.MIN_SIDE <= args.max_side <= 4096:
        print(
            f"error: --max-side must be in [{S.MIN_SIDE}, 4096], got {args.max_side}",
            file=sys.stderr,
        )
        return 2
    try:
        limits = ServingLimits(
            args.max_steps, args.max_request_pixels, args.max_queue_size, args.queue_timeout_s
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if (args.int8_unet or args.calibration_images) and args.target != "cpu":
        print("error: --int8-unet and --calibration-images are for --target cpu", file=sys.stderr)
        return 2
    if args.calibration_images and not args.int8_unet:
        print("error: --calibration-images needs --int8-unet", file=sys.stderr)
        return 2
    if args.queue_delay_us is not None and not 0 <= args.queue_delay_us <= 1_000_000:
        print(
            f"error: --queue-delay-us must be in [0, 1000000], got {args.queue_delay_us}",
            file=sys.stderr,
        )
        return 2
    try:
        lane_count(args.cpu_lanes, 1)
    except ValueError as err:
        print(f"error: --cpu-lanes: {err}", file=sys.stderr)
        return 2
    if args.cpu_layout != "models" and args.target != "cpu":
        print("error: --cpu-layout is for --target cpu", file=sys.stderr)
        return 2
    if args.cpu_rate_limit is not None and args.target != "cpu":
        print("error: --cpu-rate-limit / --no-cpu-rate-limit are for --target cpu", file=sys.stderr)
        return 2
    if args.gpu_loop != "torch" and args.target != "gpu":
        print("error: --gpu-loop is for --target gpu", file=sys.stderr)
        return 2
    if args.torch_layout != "models" and args.target != "torch":
        print("error: --torch-layout is for --target torch", file=sys.stderr)
        return 2
    if args.cuda_graphs and (args.torch_layout != "fused" or args.torch_device != "cuda"):
        print(
            "error: --cuda-graphs needs --target torch --torch-layout fused --torch-device cuda",
            file=sys.stderr,
        )
        return 2
    out = args.out or Path(f"build/model_repository_{args.target}")
    if args.target == "torch":  # the networks run as they are: no ONNX export
        from cxr_sr.train.checkpoint import load

        ckpt = load(args.checkpoint)
        specs = checkpoint_specs(
            ckpt, args.max_batch, max_side=args.max_side, budget_mib=args.attention_budget_mib
        )
        onnx = {}
    else:
        specs, onnx = export_all(
            args.checkpoint,
            args.onnx_dir,
            args.max_batch,
            max_side=args.max_side,
            budget_mib=args.attention_budget_mib,
            dynamo=args.dynamo,
            force=args.force,
        )
    if args.int8_unet:
        try:
            onnx["unet" + Q.INT8] = Q.int8_unet(
                onnx, args.checkpoint, args.onnx_dir, args.calibration_images, force=args.force
            )
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    assemble(
        args.checkpoint,
        out,
        args.target,
        specs,
        onnx,
        instances=args.instances,
        engine=args.engine,
        limits=limits,
        torch_device=args.torch_device,
        precision=args.precision,
        torch_io=args.torch_io,
        ort_arena=args.ort_arena,
        cpu_lanes=args.cpu_lanes,
        cpu_spinning=args.cpu_spinning,
        int8_unet=args.int8_unet,
        torch_layout=args.torch_layout,
        cuda_graphs=args.cuda_graphs,
        queue_delay_us=args.queue_delay_us,
        cpu_layout=args.cpu_layout,
        gpu_loop=args.gpu_loop,
        cpu_rate_limit=args.cpu_rate_limit,
    )
    print(f"[repository] {args.target} target written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
