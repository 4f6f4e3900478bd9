"""ONNX export of the three networks, each checked against torch with onnxruntime."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from cxr_sr.builders.specs import NetworkSpec
from cxr_sr.train.checkpoint import Checkpoint

log = logging.getLogger(__name__)
OPSET = 17


class EncoderGraph(torch.nn.Module):
    """LR [N,1,64,64] -> z_lr: bicubic to 256 inside the graph, then the latent mean."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__()
        self.vae = ckpt.vae

    def forward(self, LR):
        return self.vae.encode_lr(LR)


class UNetGraph(torch.nn.Module):
    """(x_t, timestep [N,1], z_lr) -> model_output."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__()
        self.denoiser = ckpt.denoiser

    def forward(self, x_t, timestep, z_lr):
        return self.denoiser(x_t, timestep[:, 0], z_lr)


class DecoderGraph(torch.nn.Module):
    """(z, LR) -> SR = clip(bicubic(LR) + residual(z), 0, 1)."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__()
        self.vae = ckpt.vae

    def forward(self, z, LR):
        return self.vae.decode(z, LR)


GRAPHS = {"vae_encoder": EncoderGraph, "unet": UNetGraph, "vae_decoder": DecoderGraph}


def export_onnx(
    ckpt: Checkpoint, spec: NetworkSpec, path: str | Path, *, dynamo: bool = False
) -> Path:
    """Export one network with a dynamic batch axis; returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = GRAPHS[spec.name](ckpt).eval()
    example = spec.example_inputs(spec.opt_batch)
    args = tuple(torch.from_numpy(example[n]) for n in spec.input_names)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer flags two branches of diffusers' Upsample2D on the batch size (>= 64) and
        # the element count (> 2**31): both only add a .contiguous() (a PyTorch kernel
        # workaround) and give the same numbers, so baking either in is harmless.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        if dynamo:
            batch = torch.export.Dim("batch", min=spec.min_batch, max=spec.max_batch)
            torch.onnx.export(
                module,
                args,
                tmp,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamo=True,
                dynamic_shapes=tuple({0: batch} for _ in args),
                external_data=False,
            )
        else:
            torch.onnx.export(
                module,
                args,
                tmp,
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes=spec.dynamic_axes(),
                opset_version=OPSET,
                dynamo=False,
            )
    tmp.replace(path)
    return path


def check_onnx(
    ckpt: Checkpoint, spec: NetworkSpec, path: str | Path, batches: tuple[int, ...] = (1, 3)
) -> float:
    """Max abs difference between onnxruntime and torch over a few batch sizes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = GRAPHS[spec.name](ckpt).eval()
    worst = 0.0
    for b in batches:
        feeds = spec.example_inputs(b, seed=b)
        (got,) = session.run(spec.output_names, feeds)
        with torch.no_grad():
            want = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names)).numpy()
        if got.shape != want.shape:
            raise RuntimeError(f"{spec.name}: onnx shape {got.shape} != torch {want.shape}")
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst
