"""One spec per exported network: the single source of tensor names, shapes and profiles.

A spec drives the ONNX export (names, dynamic batch axis), the TensorRT build
(min/opt/max optimisation profile) and the Triton ``config.pbtxt`` (dims, max_batch_size).
Shapes are per item; the batch axis is implicit (Triton's ``max_batch_size`` convention).

    vae_encoder  LR [1, 64, 64]                                   -> z_lr [C, h, w]
    unet         x_t [C, h, w], timestep [1], z_lr [C, h, w]      -> model_output [C, h, w]
    vae_decoder  z [C, h, w], LR [1, 64, 64]                      -> SR [1, 256, 256]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxr_sr.imaging import HR_SIZE, LR_SIZE

NETWORKS = ("vae_encoder", "unet", "vae_decoder")
ENSEMBLE = "cxr_sr"
SAMPLER = "sampler"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # per item, no batch axis
    dtype: str = "FP32"  # Triton type name

    @property
    def numpy_dtype(self):
        return {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64}[self.dtype]


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"{self.name}: need 1 <= min <= opt <= max batch, got "
                f"{self.min_batch}, {self.opt_batch}, {self.max_batch}"
            )

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export`` dynamic axes: the batch axis of every tensor."""
        return {t.name: {0: "batch"} for t in (*self.inputs, *self.outputs)}

    def profile(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT optimisation profile: input name -> (min, opt, max) full shapes."""
        return {
            t.name: tuple((b, *t.shape) for b in (self.min_batch, self.opt_batch, self.max_batch))
            for t in self.inputs
        }

    def example_inputs(self, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        """Plausible random inputs (images in [0, 1], latents ~N(0, 1), timesteps in [0, 300))."""
        rng = np.random.default_rng(seed)
        out = {}
        for t in self.inputs:
            shape = (batch, *t.shape)
            if t.name == "LR":
                x = rng.random(shape)
            elif t.name == "timestep":
                x = rng.integers(0, 300, shape)
            else:
                x = rng.standard_normal(shape)
            out[t.name] = x.astype(t.numpy_dtype)
        return out


def network_specs(latent_shape: tuple[int, int, int], max_batch: int = 8) -> dict[str, NetworkSpec]:
    """The three exported networks for a latent of shape (C, h, w)."""
    lr = TensorSpec("LR", (1, LR_SIZE, LR_SIZE))
    z = tuple(latent_shape)
    opt = max(1, max_batch // 2)
    kw = {"opt_batch": opt, "max_batch": max_batch}
    return {
        "vae_encoder": NetworkSpec("vae_encoder", (lr,), (TensorSpec("z_lr", z),), **kw),
        "unet": NetworkSpec(
            "unet",
            (TensorSpec("x_t", z), TensorSpec("timestep", (1,)), TensorSpec("z_lr", z)),
            (TensorSpec("model_output", z),),
            **kw,
        ),
        "vae_decoder": NetworkSpec(
            "vae_decoder",
            (TensorSpec("z", z), lr),
            (TensorSpec("SR", (1, HR_SIZE, HR_SIZE)),),
            **kw,
        ),
    }
