"""config.pbtxt from specs, through tritonclient's ``model_config_pb2`` and ``text_format``.

Image sides are ``-1`` dims: Triton accepts any size there and its dynamic batcher only
merges requests whose shapes are equal (no ``allow_ragged_batch``), so requests of one size
share batches and requests of different sizes are never concatenated. The served range of
LR sides is checked by the Python models (``input_sides`` on the networks that take ``LR``,
``latent_sides`` on the sampler, which also covers the gpu target's ONNX Runtime encoder) and
published as parameters of the ensemble (``lr_min_side``, ``lr_max_side``, ``lr_multiple``)
for clients to read with ``get_model_config``. ``max_batch_pixels`` caps what one session (or
UNet) call takes: a full batch at the opt size (64x64), one image at the largest sizes, so a
model process's memory does not grow with batch x pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from cxr_sr.builders.specs import ENSEMBLE, SAMPLER, NetworkSpec, TensorSpec
from cxr_sr.ort_cpu import DEFAULT_SPIN_MODE

TARGETS = ("cpu", "gpu", "torch")
TORCH_DEVICES = ("auto", "cuda", "cpu")  # the torch target's device; auto: CUDA where torch sees it
PRECISIONS = ("fp16", "fp32")  # the torch target's precision on CUDA (the CPU runs fp32)
# how the torch target's tensors travel between models: dlpack = where they are (GPU memory
# stays on the GPU); host = through host memory at every hop (a fallback for Python backends
# that cannot share GPU memory between processes)
TORCH_IO = ("dlpack", "host")
# the torch target's models: models = vae_encoder, sampler (BLS over unet), vae_decoder as
# separate models; fused = the sampler holds the three networks (one Python hop per request)
TORCH_LAYOUTS = ("models", "fused")
# the cpu target's layouts: chain = the sampler takes LR and calls all three networks through
# BLS (one batching point); models = the ensemble chains encoder, sampler and decoder
CPU_LAYOUTS = ("models", "chain")
# the gpu target's sampler loop: torch = latents on the GPU between steps (torch CUDA tensors
# through DLPack, the TensorRT UNet's outputs asked for in GPU memory); numpy = on the host,
# copied there at every step (a runtime without torch)
GPU_LOOPS = ("torch", "numpy")
CHAINED = ("vae_encoder", "vae_decoder")  # what a chain sampler calls besides unet
# Triton's rate limiter on the cpu target: each network instance takes one unit of this
# resource while it executes, and the server (started with --rate-limit=execution_count,
# which builders.serve adds for such a repository) has one unit, so one network runs at a time
RATE_LIMIT_RESOURCE = "cpu"


def _dtype(name: str) -> int:
    return mc.DataType.Value(f"TYPE_{name}")


def _io(cls, tensors: tuple[TensorSpec, ...]):
    return [cls(name=t.name, data_type=_dtype(t.dtype), dims=list(t.shape)) for t in tensors]


@dataclass(frozen=True)
class ServingLimits:
    """What one client can ask of the server, set at build time and published as parameters
    of the ensemble (README, "Operating the server").

    ``max_steps``: steps per request (the sampler answers INVALID_ARG above it).
    ``max_request_pixels``: LR pixels per request, N x H x W with sides padded to the
    encoder's multiple (INVALID_ARG above it); None: 4 images of the largest side.
    ``max_queue_size``: requests waiting in the queue of each model that admits requests
    (``vae_encoder`` and the sampler; the sampler alone in the chain layout); one more is
    rejected at once (UNAVAILABLE, "Exceeds maximum queue size"). ``queue_timeout_s``: a
    request waiting longer than this in such a queue is rejected; a client may ask for less
    with the ``timeout`` request parameter (microseconds; Triton's own). 0 turns either off;
    with both off no model gets a queue policy (:attr:`queue_policy`).
    """

    max_steps: int = 50
    max_request_pixels: int | None = None
    max_queue_size: int = 64
    queue_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "max_request_pixels"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("max_queue_size", "queue_timeout_s"):
            value = getattr(self, name)
            if not value >= 0:  # NaN too
                raise ValueError(f"{name} must be positive, or 0 for none, got {value}")

    @property
    def queue_policy(self) -> bool:
        """Whether the models that admit requests get a queue policy (a queue limit or a
        timeout). Triton 2.51's dynamic batcher forms the next batch while an instance is busy
        (prefetching) only for a model without one; with one, a request that arrives while the
        model's instance is still busy is not picked up until the next request arrives or the
        batcher's own half-second timer runs out (README, "Served vs in-process")."""
        return bool(self.max_queue_size or self.queue_timeout_s)

    def request_pixels(self, max_side: int) -> int:
        return self.max_request_pixels or 4 * max_side * max_side

    def parameters(self, max_side: int) -> dict[str, str]:
        """The limits as config parameters (the ensemble publishes them; the sampler reads
        ``max_steps`` and ``max_request_pixels``)."""
        return {
            "max_steps": str(self.max_steps),
            "max_request_pixels": str(self.request_pixels(max_side)),
            "max_queue_size": str(self.max_queue_size),
            "queue_timeout_s": f"{self.queue_timeout_s:g}",
        }


DEFAULT_LIMITS = ServingLimits()
# dynamic batching delay of the models the ensemble calls for clients' requests; the UNet's is
# 0: its only caller, the sampler, sends each step's whole batch in one call, so waiting there
# would add ~2 ms to every step and merge nothing
QUEUE_DELAY_US = 2000
# the cpu target's chain layout batches at one point, the sampler, instead of three: 1 ms
# there (2 cores, README "Served vs in-process": a lone LR 64 request ~3% slower than with
# no wait; four clients sending at once still land in one batch at LR 64-256)
CPU_CHAIN_QUEUE_DELAY_US = 1000


# the cpu target's models layout: the steps after vae_encoder (sampler, vae_decoder) get their
# requests from the step before, a batch's requests within a fraction of a millisecond of each
# other, so they wait 500 us, not the 2 ms clients' requests get at vae_encoder (README
# "Served vs in-process": a lone LR 64 request 1.12-1.14x the in-process time instead of
# 1.15-1.18 on a fast CPU; four clients' batches stayed whole at LR 64-256)
CPU_STEP_QUEUE_DELAY_US = 500


def default_queue_delay_us(target: str, cpu_layout: str = "models") -> int:
    """The batching delay a build uses when none is given."""
    chain = target == "cpu" and cpu_layout == "chain"
    return CPU_CHAIN_QUEUE_DELAY_US if chain else QUEUE_DELAY_US


def step_queue_delay_us(target: str, queue_delay_us: int) -> int:
    """The batching delay of the models an ensemble step feeds (the sampler and vae_decoder of
    the models layout), given the delay where clients' requests arrive: at most
    :data:`CPU_STEP_QUEUE_DELAY_US` on the cpu target, the same delay on the GPU targets."""
    return min(queue_delay_us, CPU_STEP_QUEUE_DELAY_US) if target == "cpu" else queue_delay_us


def _batching(
    config: mc.ModelConfig,
    max_batch: int,
    queue_delay_us: int,
    limits: ServingLimits,
    queue_policy: bool = True,
) -> None:
    """Dynamic batching with ``limits``' queue policy (none where ``queue_policy`` is False or
    the limits are off: then Triton's batcher may prefetch, :attr:`ServingLimits.queue_policy`)."""
    config.max_batch_size = max_batch
    db = config.dynamic_batching
    db.preferred_batch_size.extend(sorted({max(1, max_batch // 2), max_batch}))
    db.max_queue_delay_microseconds = queue_delay_us
    if not (queue_policy and limits.queue_policy):
        return
    policy = db.default_queue_policy
    policy.max_queue_size = limits.max_queue_size
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = int(limits.queue_timeout_s * 1e6)
    policy.allow_timeout_override = True


def _lr_checks(g) -> dict[str, str]:
    """The per-request checks of the LR (``cxr_sr.serving.InputChecks``): values in [0, 1],
    sides the networks were built for (``g``: the encoder's geometry)."""
    return {
        "input_ranges": json.dumps({"LR": [0.0, 1.0]}),
        "input_sides": json.dumps({"LR": [g.min_side, g.max_side]}),
    }


def network_config(
    spec: NetworkSpec,
    target: str,
    *,
    instances: int = 1,
    queue_delay_us: int = QUEUE_DELAY_US,
    parameters: dict[str, str] | None = None,
    env_path: str | None = None,
    limits: ServingLimits = DEFAULT_LIMITS,
    torch_device: str = "auto",
    precision: str = "fp16",
    torch_io: str = "dlpack",
    ort_arena: bool = True,
    cpu_lanes: str = "auto",
    cpu_spinning: str = DEFAULT_SPIN_MODE,
    chained: bool = False,
    rate_limited: bool = False,
) -> mc.ModelConfig:
    """A network's config: Python+onnxruntime on ``cpu``; TensorRT UNet + ORT VAE on ``gpu``;
    Python+PyTorch on ``torch`` (``torch_device`` cuda: KIND_GPU instances, one per GPU id
    Triton assigns; auto or cpu: KIND_CPU instances that pick their device themselves).
    ``queue_delay_us``: the batcher's wait for the models clients' requests reach; the UNet's
    is always 0 (its batches come whole from the sampler), and so is every network's when
    ``chained`` (the cpu target's chain layout: the sampler calls them all); ``vae_decoder``,
    fed by the sampler step, waits :func:`step_queue_delay_us` of it.

    Only ``vae_encoder`` of the three gets ``limits``' queue policy, where clients' requests
    enter (the sampler has it too, :func:`sampler_config`), and only when not ``chained``:
    - the models only the sampler calls (the UNet; every network when ``chained``) get none,
      whatever ``limits`` say: the sampler sends each of them one request at a time per
      sampler instance, so a queue limit there never refuses anything, while with a policy
      Triton 2.51's batcher does not prefetch and a request sent just as the previous one
      finished can wait for the batcher's half-second timer (README, "Served vs in-process");
    - ``vae_decoder`` gets none: its requests have been through the sampler's loop, and a
      refusal there would throw that work away (README, Limits: under overload a quarter of
      the sampler's runs were).

    ``rate_limited``: the instance asks Triton's rate limiter for one unit of
    :data:`RATE_LIMIT_RESOURCE` per execution (the cpu target's default: one network at a time
    on the shared cores, README "Served vs in-process")."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    config = mc.ModelConfig(name=spec.name)
    config.input.extend(_io(mc.ModelInput, spec.inputs))
    config.output.extend(_io(mc.ModelOutput, spec.outputs))
    from_sampler = chained or spec.name == "unet"  # whole batches, nothing to wait for
    if from_sampler:
        queue_delay_us = 0
    elif spec.name == "vae_decoder":  # a step's batch, arriving together
        queue_delay_us = step_queue_delay_us(target, queue_delay_us)
    # the limits refuse a request before its UNet loop, never after it
    admits = not from_sampler and spec.name != "vae_decoder"
    _batching(config, spec.max_batch, queue_delay_us, limits, queue_policy=admits)
    group = config.instance_group.add()
    group.count = instances
    if rate_limited:
        group.rate_limiter.resources.add(name=RATE_LIMIT_RESOURCE, count=1)
    params = dict(parameters or {})
    on_gpu = target == "torch" and torch_device == "cuda"  # a torch network on a GPU
    if target == "cpu":
        config.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    elif target == "torch":
        if (
            torch_device not in TORCH_DEVICES
            or precision not in PRECISIONS
            or torch_io not in TORCH_IO
        ):
            raise ValueError(
                f"torch_device must be one of {TORCH_DEVICES}, precision one of {PRECISIONS} "
                f"and torch_io one of {TORCH_IO}, got {torch_device!r}, {precision!r}, "
                f"{torch_io!r}"
            )
        config.backend = "python"
        group.kind = mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU
        params.update(network=spec.name, device=torch_device, precision=precision, io=torch_io)
        # CUDA: batches padded to power-of-two buckets, each bucket run once at load time at
        # the opt side (torch_python/model.py)
        g = spec.geometry
        opt = {t.name: list(t.concrete(g, (g.opt_side, g.opt_side))) for t in spec.inputs}
        params.update(batch_buckets="auto", warmup_shapes=json.dumps(opt))
        if torch_io == "dlpack":
            params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"  # GPU tensors arrive as they are
    else:
        group.kind = mc.ModelInstanceGroup.KIND_GPU
        if spec.name == "unet":
            config.platform = "tensorrt_plan"
        else:
            config.platform = "onnxruntime_onnx"
    if config.backend == "python" and "LR" in spec.input_names:
        for key, value in _lr_checks(spec.geometry).items():
            params.setdefault(key, value)
    if config.backend == "python":
        params.setdefault("max_batch_pixels", str(spec.batch_pixels(gpu=on_gpu)))
    if target == "cpu":
        # onnxruntime's memory arena on, memory patterns off (README, "Operating the server")
        params.setdefault("ort_cpu_mem_arena", str(bool(ort_arena)).lower())
        params.setdefault("ort_mem_pattern", "false")
        # idle onnxruntime threads busy-wait only inside a call (cxr_sr.ort_cpu.spin_mode):
        # the three network processes share the cores (README, "Served vs in-process")
        params.setdefault("intra_op_spinning", cpu_spinning)
        # a batch of several rows as parallel calls (cxr_sr.ort_cpu)
        params.setdefault("cpu_lanes", str(cpu_lanes))
    if env_path and config.backend == "python":
        params["EXECUTION_ENV_PATH"] = env_path
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    return config


def sampler_config(
    unet: NetworkSpec,
    *,
    instances: int = 1,
    queue_delay_us: int = QUEUE_DELAY_US,
    env_path: str | None = None,
    limits: ServingLimits = DEFAULT_LIMITS,
    loop_device: str = "numpy",
    fused: dict[str, NetworkSpec] | None = None,
    chain: dict[str, NetworkSpec] | None = None,
    precision: str = "fp16",
    cuda_graphs: bool = False,
) -> mc.ModelConfig:
    """The BLS sampler: z_lr -> z, calling ``unet`` once per step.

    ``loop_device`` (the sampler's ``model.py`` has the details): ``numpy`` on the host (the
    cpu target; the gpu target's ``--gpu-loop numpy``); ``torch-cuda`` keeps the latents on
    the GPU (DLPack, UNet outputs requested in GPU memory: no host copy per step; the gpu
    target's default); ``torch-cpu``; ``torch-auto`` (the torch target: CUDA where torch sees
    a GPU).

    ``fused`` (the torch target's fused layout; all three network specs): the sampler holds
    the networks itself and takes ``LR`` to ``SR``, with the encoder's input checks;
    ``precision`` and ``cuda_graphs`` apply to its networks on CUDA (KIND_GPU instances).

    ``chain`` (the cpu target's chain layout; all three network specs): ``LR`` to ``SR`` with
    the encoder's input checks, calling ``vae_encoder`` and ``vae_decoder`` through BLS as it
    calls ``unet``, so the batch forms here once (``queue_delay_us``) and those models wait
    for nothing (:func:`network_config` ``queue_delay_us`` 0)."""
    if fused is not None and chain is not None:
        raise ValueError("the sampler is fused or a chain, not both")
    z_lr = next(t for t in unet.inputs if t.name == "z_lr")
    config = mc.ModelConfig(name=SAMPLER, backend="python")
    networks = fused or chain
    if networks is None:
        config.input.extend(_io(mc.ModelInput, (z_lr,)))
        config.output.extend(_io(mc.ModelOutput, (TensorSpec("z", z_lr.shape, grid=z_lr.grid),)))
    else:
        if fused is not None and (loop_device == "numpy" or precision not in PRECISIONS):
            raise ValueError(
                "the fused layout runs torch networks: loop_device must be torch-*, precision "
                f"one of {PRECISIONS}; got {loop_device!r}, {precision!r}"
            )
        config.input.extend(_io(mc.ModelInput, networks["vae_encoder"].inputs))
        config.output.extend(_io(mc.ModelOutput, networks["vae_decoder"].outputs))
    _batching(config, unet.max_batch, queue_delay_us, limits)
    group = config.instance_group.add()
    group.count = instances
    group.kind = mc.ModelInstanceGroup.KIND_CPU  # the loop is host code; tensors stay where unet is
    # never rate-limited: it calls the networks from inside its execute, and a unit it held
    # would be the one they wait for
    on_gpu = loop_device == "torch-cuda"  # the loop (and fused: the networks) on a GPU
    if fused is not None and on_gpu:
        group.kind = mc.ModelInstanceGroup.KIND_GPU  # it runs the networks: one per GPU
    params = {
        "unet_model": unet.name,
        "unet_inputs": ",".join(unet.input_names),
        "unet_output": unet.output_names[0],
        "vae_factor": str(unet.geometry.vae_factor),
        "latent_sides": ",".join(map(str, unet.geometry.latent_sides())),
        "max_batch_pixels": str(unet.batch_pixels(gpu=on_gpu)),
        **limits.parameters(unet.geometry.max_side),
        "loop_device": loop_device,
    }
    if loop_device != "numpy":
        params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
    if networks is not None:  # LR -> SR: what vae_encoder checks, checked here
        g = networks["vae_encoder"].geometry
        params.update(lr_multiple=str(g.multiple), **_lr_checks(g))
    if chain is not None:
        stages = {n: [chain[n].input_names, chain[n].output_names[0]] for n in CHAINED}
        params.update(layout="chain", chain_models=json.dumps(stages))
    if fused is not None:
        params.update(
            layout="fused",
            precision=precision,
            cuda_graphs=str(bool(cuda_graphs)).lower(),
            batch_buckets="auto",  # CUDA: pad dynamic batches to powers of two
            warmup_side=str(g.opt_side),  # CUDA: every bucket runs once before ready
            stage_batch_pixels=json.dumps(
                {n: s.batch_pixels(gpu=on_gpu) for n, s in fused.items()}
            ),
        )
    if env_path:
        params["EXECUTION_ENV_PATH"] = env_path
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def ensemble_config(
    specs: dict[str, NetworkSpec],
    identity: dict[str, str] | None = None,
    limits: ServingLimits = DEFAULT_LIMITS,
    sampler_only: bool = False,
) -> mc.ModelConfig:
    """``cxr_sr``: LR -> vae_encoder -> sampler -> vae_decoder -> SR (``sampler_only``: LR ->
    sampler -> SR, the sampler holding the networks or calling them: the fused and chain
    layouts). ``identity``: the model's name, version and
    weights hash as config parameters (``cxr_sr.client.triton.ModelIdentity.parameters``),
    for clients to read."""
    enc, dec = specs["vae_encoder"], specs["vae_decoder"]
    config = mc.ModelConfig(name=ENSEMBLE, platform="ensemble", max_batch_size=enc.max_batch)
    config.input.extend(_io(mc.ModelInput, enc.inputs))
    config.output.extend(_io(mc.ModelOutput, dec.outputs))
    g = enc.geometry
    sizes = {"lr_min_side": g.min_side, "lr_max_side": g.max_side, "lr_multiple": g.multiple}
    published = {**sizes, **limits.parameters(g.max_side), **(identity or {})}
    for key, value in published.items():
        config.parameters[key].string_value = str(value)
    steps = [
        (enc.name, {"LR": "LR"}, {"z_lr": "z_lr"}),
        (SAMPLER, {"z_lr": "z_lr"}, {"z": "z"}),
        (dec.name, {"z": "z", "LR": "LR"}, {"SR": "SR"}),
    ]
    if sampler_only:
        steps = [(SAMPLER, {"LR": "LR"}, {"SR": "SR"})]
    for model, inputs, outputs in steps:
        step = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        for k, v in inputs.items():
            step.input_map[k] = v
        for k, v in outputs.items():
            step.output_map[k] = v
    return config


def write_config(config: mc.ModelConfig, model_dir: str | Path) -> Path:
    path = Path(model_dir) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(config))
    return path


def read_config(path: str | Path) -> mc.ModelConfig:
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
