"""Triton Python-backend model wrapping an onnxruntime session (the ``cpu`` target).

Used for ``vae_encoder``, ``unet`` and ``vae_decoder``: ``builders.build`` copies this file
next to each ``model.onnx``. Tensor names come from the model's config.pbtxt (written from
the network spec). The requests of a dynamic batch that have the same shapes (Triton only
batches equal shapes; requests of other sizes come in other batches) are run as one batch by
``cxr_sr.ort_cpu.CpuNetwork``: in calls of at most ``max_batch_pixels`` pixels (a full batch at
64x64, one image at the largest sizes), a batch of several rows spread over ``cpu_lanes``
parallel calls (``auto``: 2 when the model has 2 or more intra-op threads; ``CXR_ORT_LANES``
overrides it); idle intra-op threads as ``intra_op_spinning`` says (``cxr_sr.ort_cpu.spin_mode``;
``CXR_ORT_SPINNING`` overrides it). Inputs named in the config parameters
``input_ranges`` (JSON ``{"LR": [0, 1]}``) and ``input_sides`` (JSON ``{"LR": [16, 256]}``:
[N, 1, H, W] with H, W in that range) are checked per request: a request with NaN,
out-of-range values or sides gets its own INVALID_ARG error naming them, the rest are served.
Request parameters are not read: the ensemble forwards the client's sampling parameters to
every step, and only the ``sampler`` checks them.
"""

import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from cxr_sr.ort_cpu import CpuNetwork, lane_count, lane_setting, spin_setting
from cxr_sr.serving import InputChecks, model_parameters, parse_flag


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_parameters(args)
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.checks = InputChecks.from_parameters(params)
        threads = int(params.get("intra_op_threads", os.environ.get("CXR_ORT_THREADS", "0")))
        # a batch of several rows runs as parallel calls with fewer threads each
        # (cxr_sr.ort_cpu; README, "Served vs in-process"); a bad setting fails the load
        lanes = lane_count(lane_setting(params.get("cpu_lanes")), threads)
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.network = CpuNetwork(
            path,
            threads,
            lanes=lanes,
            max_pixels=int(params.get("max_batch_pixels", "0")) or None,
            # idle intra-op threads busy-wait at most while a call runs (the builder's default
            # "run"): three of these processes share the cores, and a pool spinning between
            # calls takes CPU from the stage that has work
            spinning=spin_setting(params.get("intra_op_spinning")),
            # memory (README, "Operating the server"): onnxruntime's CPU arena keeps the peak
            # of the largest request it has served (bounded by the build's largest side: ~0.35
            # GB for the demo UNet, ~0.65 GB for its decoder at LR 256) and never returns it;
            # without it a process falls back to ~0.1-0.2 GB between requests but pays for
            # fresh pages on every call (LR 256 1.6-2.2x slower). Memory patterns (one planned
            # block per input shape, remembered per shape) are off: with dynamic batch and
            # sides nearly every tile size is a new shape, and with the arena they made each
            # process hold 1.4-1.6x more for the same speed (benchmarks.ort_memory).
            arena=parse_flag(params.get("ort_cpu_mem_arena", "true")),
            mem_pattern=parse_flag(params.get("ort_mem_pattern", "false")),
        )

    def execute(self, requests):
        responses = [None] * len(requests)
        batches = {}  # input shapes -> [(request index, {name: array})]
        for i, request in enumerate(requests):
            feeds = {
                n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs
            }
            problem = self.checks.problem(feeds)
            if problem:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG)
                )
            else:
                shapes = tuple(feeds[n].shape[1:] for n in self.inputs)
                batches.setdefault(shapes, []).append((i, feeds))
        for batch in batches.values():
            self._run(batch, responses)
        return responses

    def finalize(self):
        self.network.close()

    def _run(self, batch, responses):
        """Requests of equal shapes, run as one batch (``CpuNetwork``: calls of at most
        ``max_batch_pixels``, spread over the lanes); fills their responses."""
        merged = {n: np.concatenate([f[n] for _, f in batch]) for n in self.inputs}
        try:
            results = self.network.run(self.outputs, merged)
        except Exception as err:  # answer every request rather than failing the batch
            for i, _ in batch:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(
                        f"onnxruntime failed: {err}", pb_utils.TritonError.INTERNAL
                    )
                )
            return
        start = 0
        for i, feeds in batch:
            n = len(feeds[self.inputs[0]])
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(r[start : start + n]))
                for name, r in zip(self.outputs, results, strict=True)
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += n
