"""Triton Python-backend BLS model: the timestep loop over ``unet``.

Input ``z_lr`` [N, C, h, w] (latent of the LR image, padded by the encoder graph to the
sides the UNet needs), output ``z`` [N, C, h, w]. Per-request parameters (JSON) are the
request schema's keys (``cxr_sr.sampling.REQUEST_PARAMS``: steps, sampler, eta, start,
strength, spacing, seed, origin_y, origin_x), parsed by ``cxr_sr.serving``; any other key gets
that request an INVALID_ARG naming it (the optional config parameter ``ignored_parameters``,
comma-separated, lists keys to let through, e.g. forwarded headers). Defaults come from
``sampling.json`` next to this file, the schedule from ``scheduler_config.json`` (both copied
from the checkpoint by ``builders.build``); the config parameters ``vae_factor`` (LR pixel ->
latent pixel, for the tile origin) and ``latent_sides`` ("min,max": what the UNet was built
for; a request outside gets INVALID_ARG) come from the network specs.

Limits (config parameters written by ``builders.build``): ``max_steps`` (a request asking for
more gets INVALID_ARG naming it) and ``max_request_pixels`` (LR pixels per request, sides
padded to the encoder's multiple). Between steps the loop asks Triton whether its clients are
still there (``request.is_cancelled()``): when every request of a loop was cancelled, it
stops and answers CANCELLED.

Where the loop's arrays live (config parameter ``loop_device``, written by ``builders.build``):
``numpy`` (the cpu target; the gpu target built with ``--gpu-loop numpy``) keeps them on the
host; ``torch-cuda`` (the torch target on a GPU, and the gpu target) keeps the latents on the
GPU from the encoder's output to the decoder's input: inputs arrive in GPU memory
(``FORCE_CPU_ONLY_INPUT_TENSORS`` "no"), tensors go to and come from ``unet`` through DLPack
with the UNet's outputs requested in GPU memory, so no step copies to the host;
``torch-cpu`` runs the same torch path on the CPU (the torch target without a GPU);
``torch-auto`` is ``torch-cuda`` where torch sees a GPU, else ``torch-cpu``.

Layout (config parameter ``layout``, written by ``builders.build --torch-layout``): ``models``
(default) calls ``unet`` through BLS and is one step of the ``cxr_sr`` ensemble between
``vae_encoder`` and ``vae_decoder``. ``fused`` (the torch target) holds the three networks
itself (``builders.graphs.TorchStage``, from ``checkpoint/`` next to this file): input ``LR``,
output ``SR``, and ``cxr_sr`` has this model as its only step, so a request crosses one
process boundary instead of five plus two per step. On CUDA the networks may replay as CUDA
graphs (``cuda_graphs`` "true"). The LR is checked here as ``vae_encoder`` checks it
(``input_ranges``, ``input_sides``, ``max_request_pixels``). ``chain`` (opt-in on the cpu target,
``builders.build --cpu-layout chain``) takes ``LR`` to ``SR`` too, with the same checks,
and calls ``vae_encoder``, ``unet`` (per step) and ``vae_decoder`` through BLS (config
parameter ``chain_models``: each model's input and output names): the dynamic batch forms
once, here, and goes through the three networks whole, one after the other. In the
``models`` layout each network's batcher forms its own batches and waits for them (the
batching delay, three times per request), and when a batch splits, two requests' stages run
at once and their thread pools contend for the same cores.

Requests with the same options and latent size are sampled in one loop, so the UNet sees the
whole dynamic batch each step (Triton only batches requests of equal shapes anyway). Every
row's noise is keyed by (seed, row, global latent position) (``cxr_sr.noise``), so a result
does not depend on what it was batched with, and tiles of one image agree where they overlap.
"""

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from cxr_sr import SamplingOptions, Schedule, sample
from cxr_sr.imaging import SCALE
from cxr_sr.noise import legacy_block, noise_keys, noise_threads
from cxr_sr.sampling import latent_origin
from cxr_sr.serving import (
    InputChecks,
    options_key,
    parse_flag,
    parse_parameters,
    row_chunks,
)


class StageError(RuntimeError):
    pass


class CancelledError(RuntimeError):
    pass


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        self.schedule = Schedule.load(here)
        self.defaults = SamplingOptions(**json.loads((here / "sampling.json").read_text()))
        self.unet = params["unet_model"]
        self.x_name, self.t_name, self.cond_name = params["unet_inputs"].split(",")
        self.out_name = params["unet_output"]
        self.max_batch = int(config["max_batch_size"])
        ignored = params.get("ignored_parameters", "").split(",")
        self.ignored = tuple(k.strip() for k in ignored if k.strip())
        self.vae_factor = int(params.get("vae_factor", "4"))
        self.noise_block = legacy_block(self.vae_factor)
        self.max_pixels = int(params.get("max_batch_pixels", "0")) or None
        self.max_steps = int(params.get("max_steps", "0")) or None
        self.max_request_pixels = int(params.get("max_request_pixels", "0")) or None
        sides = params.get("latent_sides", "")
        self.latent_sides = tuple(int(v) for v in sides.split(",")) if sides else None
        self.arrays = _Arrays(
            params.get("loop_device", "numpy"), args.get("model_instance_device_id")
        )
        noise_threads()  # a bad CXR_NOISE_THREADS fails the load, not every request
        layout = params.get("layout", "models")
        if layout not in ("models", "chain", "fused"):
            raise ValueError(f"layout must be models, chain or fused, got {layout!r}")
        self.fused = layout == "fused"
        self.chain = json.loads(params["chain_models"]) if layout == "chain" else None
        self.takes_lr = layout != "models"  # LR -> SR, checked here as vae_encoder checks it
        if self.takes_lr:
            self.checks = InputChecks.from_parameters(params)
            self.lr_multiple = int(params.get("lr_multiple", "1"))
        if self.fused:
            self._load_networks(here, params)
        self.input_name, self.result_name = ("LR", "SR") if self.takes_lr else ("z_lr", "z")
        # what the host-memory warning calls the tensors the loop receives
        self.labels = (f"input {self.input_name}", f"{self.unet} output {self.out_name}")

    def _load_networks(self, here, params):
        """``layout`` fused: the encoder, UNet and decoder in this process, on the loop's device."""
        if self.arrays.torch is None:
            raise ValueError("layout 'fused' needs a torch loop_device (the torch target)")
        from cxr_sr.builders import graphs  # torch modules: the torch target's only
        from cxr_sr.train.checkpoint import load

        device = self.arrays.device
        on_gpu = device.type == "cuda"
        half = on_gpu and params.get("precision", "fp16") == "fp16"
        graphed = on_gpu and parse_flag(params.get("cuda_graphs", "false"))
        buckets = params.get("batch_buckets", "auto")
        self.buckets = on_gpu if buckets == "auto" else parse_flag(buckets)
        self.arrays.torch.backends.cudnn.benchmark = True
        ckpt = load(here / "checkpoint")
        self.networks = {}
        for name in ("vae_encoder", "unet", "vae_decoder"):
            stage = graphs.TorchStage(ckpt.vae, ckpt.denoiser, name, device, half)
            self.networks[name] = graphs.GraphedStage(stage) if graphed else stage
        self.graphs = graphs
        self.stage_pixels = json.loads(params.get("stage_batch_pixels", "{}"))
        warm_side = int(params.get("warmup_side", "0"))
        if on_gpu and warm_side:
            try:
                self._warm(warm_side)
            except Exception as err:  # noqa: BLE001 - the first requests then pay instead
                pb_utils.Logger.log_warn(f"sampler: warm-up at LR {warm_side} failed: {err}")

    def _warm(self, side):
        """Run every batch bucket once at the LR side most requests have, before the server
        reports ready: cuDNN's autotuning and the CUDA graphs' capture happen here, not in the
        first requests' latency. Other sides are captured on first use."""
        torch = self.arrays.torch
        start = time.perf_counter()
        # largest first: smaller graphs share its memory
        budget = self.stage_pixels.get("vae_encoder")
        sizes = self.graphs.bucket_sizes(side * side, budget, self.max_batch)
        for rows in sizes:
            lr = torch.zeros((rows, 1, side, side), device=self.arrays.device)
            z_lr = self._local("vae_encoder", lr)
            t = torch.zeros((rows, 1), device=lr.device)
            self._local("unet", z_lr, t, z_lr)
            self._local("vae_decoder", z_lr, lr)
        if self.arrays.device.type == "cuda":
            torch.cuda.synchronize(self.arrays.device)
        pb_utils.Logger.log_info(
            f"sampler: networks warmed at LR {side} for batches {sizes} in "
            f"{time.perf_counter() - start:.1f} s"
        )

    def _local(self, name, *inputs):
        """One in-process network over a batch, in calls of at most its pixel budget, each
        at its bucket's size with ``batch_buckets`` (``builders.graphs.run_in_calls``)."""
        budget = self.stage_pixels.get(name)
        run = self.networks[name]
        return self.graphs.run_in_calls(run, inputs, budget, self.max_batch, self.buckets)

    def _check_latent(self, z_lr):
        """None, or why this latent is outside what the UNet was built for."""
        if self.latent_sides is None:
            return None
        low, high = self.latent_sides
        h, w = z_lr.shape[-2:]
        if low <= h <= high and low <= w <= high:
            return None
        return (
            f"latent 'z_lr' is {h}x{w}: this server takes LR images whose latent sides are in "
            f"[{low}, {high}] (LR sides in the range its encoder accepts)"
        )

    def _check_pixels(self, z_lr):
        """None, or why this request holds too many (padded LR) pixels."""
        n, _, h, w = z_lr.shape
        lr_h, lr_w = h * self.vae_factor // SCALE, w * self.vae_factor // SCALE
        return self._pixel_problem(n, lr_h, lr_w)

    def _stage(self, name, *inputs, trace=None):
        """``vae_encoder`` or ``vae_decoder`` over a group: in this process (fused) or
        through BLS (chain)."""
        if self.fused:
            return self._local(name, *inputs)
        names, output = self.chain[name]
        return self._call(name, dict(zip(names, inputs, strict=True)), output, None, trace=trace)

    def _check_lr(self, lr):
        """``layout`` fused or chain: None, or why this LR is refused (what ``vae_encoder``
        checks)."""
        problem = self.checks.problem({"LR": lr}, _numpy)
        if problem:
            return problem
        n, _, h, w = lr.shape
        m = self.lr_multiple
        return self._pixel_problem(n, -(-h // m) * m, -(-w // m) * m)

    def _pixel_problem(self, n, lr_h, lr_w):
        pixels = n * lr_h * lr_w
        if not self.max_request_pixels or pixels <= self.max_request_pixels:
            return None
        side = f"{lr_h}x{lr_w}"
        return (
            f"request of {n} LR image(s) of {side} (sides padded to the encoder's multiple) = "
            f"{pixels:,} pixels; this server takes at most {self.max_request_pixels:,} per "
            "request (max_request_pixels): send fewer or smaller images"
        )

    def _denoise(self, x_t, t, z_lr, trace=None):
        """One UNet pass over the loop's batch, in requests of at most the UNet's max batch
        and ``max_batch_pixels`` latent pixels (one image at the largest sizes)."""
        if self.fused:
            return self._local("unet", x_t, t.reshape(-1, 1), z_lr)
        inputs = {self.x_name: x_t, self.t_name: t.reshape(-1, 1), self.cond_name: z_lr}
        return self._call(
            self.unet, inputs, self.out_name, self.max_pixels, self.labels[1], trace=trace
        )

    def _call(self, model, inputs, output, max_pixels, label=None, trace=None):
        """``model`` through BLS over a batch ``inputs`` (name -> array, equal rows), in
        requests of at most this model's max batch and ``max_pixels`` pixels per request
        (None: the callee splits by its own budget); returns ``output`` for all rows.
        ``trace``: the trace context the BLS requests join (None: untraced)."""
        outs = []
        first = next(iter(inputs.values()))
        pixels = int(np.prod(first.shape[2:]))
        a = self.arrays
        traced = {} if trace is None else {"trace": trace}
        for s in row_chunks(len(first), pixels, max_pixels, self.max_batch):
            request = pb_utils.InferenceRequest(
                model_name=model,
                requested_output_names=[output],
                inputs=[a.tensor(name, x[s]) for name, x in inputs.items()],
                **a.request_memory,
                **traced,
            )
            response = request.exec()
            if response.has_error():
                raise StageError(f"{model} failed: {response.error().message()}")
            tensor = pb_utils.get_output_tensor_by_name(response, output)
            outs.append(a.array(tensor, label or f"{model} output {output}"))
        return a.cat(outs)

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
            # fused: the client's LR is checked where it arrived (host memory) and moves to
            # the loop's device once per group, below
            if self.fused:
                x = self.arrays.view(tensor)
            else:
                x = self.arrays.array(tensor, self.labels[0])
            try:
                options, seed, origin = parse_parameters(
                    request.parameters(),
                    self.defaults,
                    self.schedule.num_train_timesteps,
                    ignore=self.ignored,
                    max_steps=self.max_steps,
                )
                origin = latent_origin(origin, self.vae_factor)
                if self.takes_lr:
                    problem = self._check_lr(x)
                else:
                    problem = self._check_latent(x) or self._check_pixels(x)
                if problem:
                    raise ValueError(problem)
            except ValueError as err:
                responses[i] = _error(str(err), pb_utils.TritonError.INVALID_ARG)
                continue
            key = (options_key(options), x.shape[1:])
            groups.setdefault(key, (options, []))[1].append((i, x, (seed, origin)))

        for options, items in groups.values():
            x = self.arrays.cat([z for _, z, _ in items])
            if self.fused:
                x = self.arrays.to_loop(x)
            keys = noise_keys(
                [s for _, _, (s, _) in items],
                [len(z) for _, z, _ in items],
                [o for _, _, (_, o) in items],
                self.noise_block,
            )
            clients = [requests[i] for i, _, _ in items]
            # the BLS calls of this group join its first client's trace (Triton's request
            # tracing then shows the UNet steps, and in the chain the VAE calls, under it)
            trace = _trace_of(clients[0])

            def denoise(x_t, t, z, clients=clients, trace=trace):
                if all(r.is_cancelled() for r in clients):  # asked before every step
                    raise CancelledError("every client of this sampling loop cancelled")
                return self._denoise(x_t, t, z, trace)

            try:
                z_lr = self._stage("vae_encoder", x, trace=trace) if self.takes_lr else x
                z = sample(denoise, z_lr, self.schedule, options, keys)
                out = self._stage("vae_decoder", z, x, trace=trace) if self.takes_lr else z
            except CancelledError as err:
                for i, _, _ in items:
                    responses[i] = _error(str(err), pb_utils.TritonError.CANCELLED)
                continue
            except Exception as err:  # one failing group must not fail the others
                for i, _, _ in items:
                    responses[i] = _error(f"sampling failed: {err}", pb_utils.TritonError.INTERNAL)
                continue
            if self.fused:  # SR goes to the client: one copy to host memory per group
                out = out.cpu()
            start = 0
            for i, rows, _ in items:
                part = out[start : start + len(rows)]
                start += len(rows)
                tensor = self.arrays.tensor(self.result_name, part)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses


class _Arrays:
    """The loop's arrays: numpy on the host, or torch tensors on the CPU or a GPU, exchanged
    with Triton through DLPack (torch is imported only for the torch loops)."""

    def __init__(self, device: str, gpu_id: str | None = None):
        if device not in ("numpy", "torch-cpu", "torch-cuda", "torch-auto"):
            raise ValueError(f"loop_device must be numpy or torch-cpu|cuda|auto, got {device!r}")
        self.torch = None
        self.request_memory = {}
        if device != "numpy":
            try:
                import torch  # only the torch loops need it
            except ImportError:
                raise RuntimeError(
                    f"loop_device {device!r} needs torch in the server's Python (pip install "
                    "'cxr-sr[torch]'); a gpu-target repository built with --gpu-loop numpy "
                    "loops on the host without it"
                ) from None

            self.torch = torch
            if device == "torch-auto":
                device = "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
            index = int(gpu_id or 0)  # a KIND_GPU instance's device; KIND_CPU: GPU 0
            self.device = torch.device(f"cuda:{index}" if device == "torch-cuda" else "cpu")
            if self.device.type == "cuda":  # ask unet for its outputs where the loop keeps state
                torch.cuda.set_device(self.device)
                memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, index)
                self.request_memory = {"preferred_memory": memory}
        # per input/output name: tensors that came from Triton in host memory (torch-cuda: none)
        self.host_copies = {}

    def array(self, tensor, name):
        """A Triton tensor as this loop's array, on the loop's device, owned by the loop
        (``name``: which input or output it is, for the host-memory warning)."""
        if self.torch is None:
            return tensor.as_numpy()
        if tensor.is_cpu() and self.device.type == "cuda":
            self.host_copies[name] = self.host_copies.get(name, 0) + 1
            if self.host_copies[name] == 1:
                pb_utils.Logger.log_warn(
                    f"sampler: a tensor arrived in host memory although the loop runs on "
                    f"the GPU ({name}); copying it (this warning once per name)"
                )
        return self.to_loop(self.view(tensor), copy=True)

    def view(self, tensor):
        """A Triton tensor as a torch tensor where Triton put it, without a copy (valid while
        its request is): DLPack in host memory too, never the stub's numpy bridge, which
        misreads arrays under numpy 2."""
        return self.torch.from_dlpack(tensor.to_dlpack())

    def to_loop(self, x, copy=False):
        """``x`` on the loop's device (``copy``: never a view of Triton's memory)."""
        if x.device != self.device:
            x = x.to(self.device)
        elif copy:
            x = x.clone()
        if x.is_cuda:  # the copy is queued: finish it before Triton frees the source
            self.torch.cuda.current_stream(x.device).synchronize()
        return x

    def tensor(self, name, x):
        if self.torch is None:
            return pb_utils.Tensor(name, np.ascontiguousarray(x))
        x = x.contiguous()
        if x.is_cuda:  # the next model reads it from another stream and process
            self.torch.cuda.current_stream(x.device).synchronize()
        return pb_utils.Tensor.from_dlpack(name, self.torch.utils.dlpack.to_dlpack(x))

    def cat(self, parts):
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if self.torch is None else self.torch.cat(parts)


def _trace_of(request):
    """The request's trace context, for the BLS requests it leads to (Python backend 24.04
    and later; None where the backend has none)."""
    trace = getattr(request, "trace", None)
    return trace() if callable(trace) else None


def _numpy(x):
    """An input as numpy for the value checks (torch tensors are copied to the host)."""
    return x if isinstance(x, np.ndarray) else x.float().cpu().numpy()


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
