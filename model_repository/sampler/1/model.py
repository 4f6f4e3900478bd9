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
``numpy`` (the cpu target) keeps them on the host; ``torch-cuda`` (the torch target on a GPU)
keeps the latents on the GPU from the encoder's output to the decoder's input: inputs arrive
in GPU memory (``FORCE_CPU_ONLY_INPUT_TENSORS`` "no"), tensors go to and come from ``unet``
through DLPack with the UNet's outputs requested in GPU memory, so no step copies to the host;
``torch-cpu`` runs the same torch path on the CPU (the torch target without a GPU);
``torch-auto`` is ``torch-cuda`` where torch sees a GPU, else ``torch-cpu``.

Requests with the same options and latent size are sampled in one loop, so the UNet sees the
whole dynamic batch each step (Triton only batches requests of equal shapes anyway). Every
row's noise is keyed by (seed, row, global latent position) (``cxr_sr.noise``), so a result
does not depend on what it was batched with, and tiles of one image agree where they overlap.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from cxr_sr import SamplingOptions, Schedule, sample
from cxr_sr.imaging import SCALE
from cxr_sr.noise import legacy_block, noise_keys
from cxr_sr.sampling import latent_origin
from cxr_sr.serving import options_key, parse_parameters, row_chunks


class UNetError(RuntimeError):
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
        self.arrays = _Arrays(params.get("loop_device", "numpy"))

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
        pixels = n * lr_h * lr_w
        if not self.max_request_pixels or pixels <= self.max_request_pixels:
            return None
        side = f"{lr_h}x{lr_w}"
        return (
            f"request of {n} LR image(s) of {side} (sides padded to the encoder's multiple) = "
            f"{pixels:,} pixels; this server takes at most {self.max_request_pixels:,} per "
            "request (max_request_pixels): send fewer or smaller images"
        )

    def _denoise(self, x_t, t, z_lr):
        """One UNet pass over the loop's batch, in requests of at most the UNet's max batch
        and ``max_batch_pixels`` latent pixels (one image at the largest sizes)."""
        outs = []
        pixels = int(np.prod(x_t.shape[2:]))
        limit = min(self.max_pixels or pixels * self.max_batch, pixels * self.max_batch)
        a = self.arrays
        for s in row_chunks(len(x_t), pixels, limit):
            request = pb_utils.InferenceRequest(
                model_name=self.unet,
                requested_output_names=[self.out_name],
                inputs=[
                    a.tensor(self.x_name, x_t[s]),
                    a.tensor(self.t_name, t[s].reshape(-1, 1)),
                    a.tensor(self.cond_name, z_lr[s]),
                ],
                **a.request_memory,
            )
            response = request.exec()
            if response.has_error():
                raise UNetError(f"unet failed: {response.error().message()}")
            outs.append(a.array(pb_utils.get_output_tensor_by_name(response, self.out_name)))
        return a.cat(outs)

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}
        for i, request in enumerate(requests):
            z_lr = self.arrays.array(pb_utils.get_input_tensor_by_name(request, "z_lr"))
            try:
                options, seed, origin = parse_parameters(
                    request.parameters(),
                    self.defaults,
                    self.schedule.num_train_timesteps,
                    ignore=self.ignored,
                    max_steps=self.max_steps,
                )
                origin = latent_origin(origin, self.vae_factor)
                problem = self._check_latent(z_lr) or self._check_pixels(z_lr)
                if problem:
                    raise ValueError(problem)
            except ValueError as err:
                responses[i] = _error(str(err), pb_utils.TritonError.INVALID_ARG)
                continue
            key = (options_key(options), z_lr.shape[1:])
            groups.setdefault(key, (options, []))[1].append((i, z_lr, (seed, origin)))

        for options, items in groups.values():
            z_lr = self.arrays.cat([z for _, z, _ in items])
            keys = noise_keys(
                [s for _, _, (s, _) in items],
                [len(z) for _, z, _ in items],
                [o for _, _, (_, o) in items],
                self.noise_block,
            )
            clients = [requests[i] for i, _, _ in items]

            def denoise(x_t, t, z, clients=clients):
                if all(r.is_cancelled() for r in clients):  # asked before every step
                    raise CancelledError("every client of this sampling loop cancelled")
                return self._denoise(x_t, t, z)

            try:
                z = sample(denoise, z_lr, self.schedule, options, keys)
            except CancelledError as err:
                for i, _, _ in items:
                    responses[i] = _error(str(err), pb_utils.TritonError.CANCELLED)
                continue
            except Exception as err:  # one failing group must not fail the others
                for i, _, _ in items:
                    responses[i] = _error(f"sampling failed: {err}", pb_utils.TritonError.INTERNAL)
                continue
            start = 0
            for i, rows, _ in items:
                out = z[start : start + len(rows)]
                start += len(rows)
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[self.arrays.tensor("z", out)]
                )
        return responses


class _Arrays:
    """The loop's arrays: numpy on the host, or torch tensors on the CPU or a GPU, exchanged
    with Triton through DLPack (torch is imported only for the torch loops)."""

    def __init__(self, device: str):
        if device not in ("numpy", "torch-cpu", "torch-cuda", "torch-auto"):
            raise ValueError(f"loop_device must be numpy or torch-cpu|cuda|auto, got {device!r}")
        self.torch = None
        self.request_memory = {}
        if device != "numpy":
            import torch  # only the torch target's sampler needs it

            self.torch = torch
            if device == "torch-auto":
                device = "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
            self.device = torch.device("cuda" if device == "torch-cuda" else "cpu")
            if self.device.type == "cuda":  # ask unet for its outputs where the loop keeps state
                memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, 0)
                self.request_memory = {"preferred_memory": memory}
        self.host_copies = 0  # tensors that came from Triton in host memory (torch-cuda: 0)

    def array(self, tensor):
        """A Triton tensor as this loop's array (no copy where it already is in place)."""
        if self.torch is None:
            return tensor.as_numpy()
        if tensor.is_cpu():
            if self.device.type == "cuda":
                self.host_copies += 1
                if self.host_copies == 1:
                    pb_utils.Logger.log_warn(
                        "sampler: a tensor arrived in host memory although the loop runs on "
                        "the GPU; copying it (once per tensor from now on)"
                    )
            return self.torch.from_numpy(tensor.as_numpy()).to(self.device)
        x = self.torch.from_dlpack(tensor.to_dlpack()).clone()
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


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
