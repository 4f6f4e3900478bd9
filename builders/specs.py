"""One spec per exported network: the single source of tensor names, shapes and profiles.

A spec drives the ONNX export (names, dynamic batch and spatial axes), the TensorRT build
(min/opt/max optimisation profile over batch and sides) and the Triton ``config.pbtxt``
(dims with -1 for the sides, max_batch_size). Shapes are per item; the batch axis is implicit
(Triton's ``max_batch_size`` convention); -1 marks a side that follows the request's image.

    vae_encoder  LR [1, H, W]                                     -> z_lr [C, h, w]
    unet         x_t [C, h, w], timestep [1], z_lr [C, h, w]      -> model_output [C, h, w]
    vae_decoder  z [C, h, w], LR [1, H, W]                        -> SR [1, 4H, 4W]

with H, W in [min_side, max_side] and h = 4 * ceil(H / m) * m / f (:class:`Geometry`: the
encoder graph pads the LR to multiples of m, see ``builders.graphs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxr_sr.imaging import LR_SIZE, SCALE

NETWORKS = ("vae_encoder", "unet", "vae_decoder")
ENSEMBLE = "cxr_sr"
SAMPLER = "sampler"
MIN_SIDE = 16  # the contract's smallest LR side
MAX_SIDE = 256  # default largest LR side (1024x1024 out); a build option
OPT_SIDE = LR_SIZE  # the size TensorRT tunes for: the reference protocol's LR
GRIDS = ("lr", "latent", "sr")  # what a tensor's spatial sides follow


@dataclass(frozen=True)
class Geometry:
    """The LR sizes a repository serves and how they map onto the networks' grids.

    ``vae_factor`` f: image pixels per latent pixel; ``multiple`` m: LR sides are padded to
    multiples of it inside the pipeline (``builders.graphs.lr_multiple``); LR sides in
    [``min_side``, ``max_side``]; ``opt_side``: the size TensorRT tunes for.
    """

    vae_factor: int = 4
    multiple: int = 4
    min_side: int = MIN_SIDE
    max_side: int = MAX_SIDE
    opt_side: int = OPT_SIDE

    def __post_init__(self) -> None:
        if self.vae_factor < 1 or self.multiple < 1:
            raise ValueError(f"vae_factor and multiple must be >= 1, got {self}")
        if not self.multiple <= self.min_side <= self.opt_side <= self.max_side:
            raise ValueError(
                "need multiple <= min_side <= opt_side <= max_side, got "
                f"{self.multiple}, {self.min_side}, {self.opt_side}, {self.max_side}"
            )

    def padded(self, side: int) -> int:
        """An LR side rounded up to the multiple the networks need."""
        return -(-side // self.multiple) * self.multiple

    def side(self, grid: str, lr_side: int) -> int:
        """The side of a tensor on ``grid`` for an LR side."""
        if grid == "lr":
            return lr_side
        if grid == "sr":
            return SCALE * lr_side
        if grid == "latent":
            return SCALE * self.padded(lr_side) // self.vae_factor
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")

    def latent_sides(self) -> tuple[int, int]:
        """Smallest and largest latent side the UNet sees."""
        return self.side("latent", self.min_side), self.side("latent", self.max_side)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # per item, no batch axis; -1 = a side on ``grid``
    dtype: str = "FP32"  # Triton type name
    grid: str | None = None  # "lr", "latent" or "sr": the last two axes follow the image

    def __post_init__(self) -> None:
        if self.grid is not None and (self.grid not in GRIDS or self.shape[-2:] != (-1, -1)):
            raise ValueError(f"{self.name}: a tensor on a grid has shape [..., -1, -1]")

    @property
    def numpy_dtype(self):
        return {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64}[self.dtype]

    def concrete(self, geometry: Geometry, lr_size: tuple[int, int]) -> tuple[int, ...]:
        """The per-item shape for an LR of ``lr_size`` (H, W)."""
        if self.grid is None:
            return self.shape
        sides = tuple(geometry.side(self.grid, s) for s in lr_size)
        return (*self.shape[:-2], *sides)


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 8
    geometry: Geometry = Geometry()

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

    def batch_pixels(self, gpu: bool = False) -> int:
        """The most pixels (of the first input's sides) one session call takes: a full batch
        at the opt size, but never more than one image of the largest size. A dynamic batch
        of larger images runs in several calls (``cxr_sr.serving.row_chunks``), so a model's
        memory stays bounded at every size, and at the largest size it is one image's.

        ``gpu``: for a network that runs on a GPU, where one image of the largest size is not
        what memory allows but the batch is what keeps the device busy: a full batch at the
        opt size in one call (4 images of the largest size for the default geometry), and
        never less than one image of the largest size."""
        g = self.geometry

        def pixels(side: int) -> int:
            return int(np.prod(self.inputs[0].concrete(g, (side, side))[-2:]))

        full = self.max_batch * pixels(g.opt_side)
        largest = pixels(g.max_side)
        return max(full, largest) if gpu else min(full, largest)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export`` dynamic axes: the batch axis of every tensor and the sides
        of tensors on a grid (one symbol per grid: ``lr_height``, ``latent_width``, ...)."""
        axes = {}
        for t in (*self.inputs, *self.outputs):
            axes[t.name] = {0: "batch"}
            if t.grid:
                rank = len(t.shape) + 1
                axes[t.name].update({rank - 2: f"{t.grid}_height", rank - 1: f"{t.grid}_width"})
        return axes

    def profile(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT optimisation profile: input name -> (min, opt, max) full shapes, over the
        batch and the sides (min_side, opt_side, max_side of the geometry)."""
        g = self.geometry
        points = (
            (self.min_batch, g.min_side),
            (self.opt_batch, g.opt_side),
            (self.max_batch, g.max_side),
        )
        return {t.name: tuple((b, *t.concrete(g, (s, s))) for b, s in points) for t in self.inputs}

    def example_inputs(
        self, batch: int, seed: int = 0, lr_size: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray]:
        """Plausible random inputs for an LR of ``lr_size`` (default: the opt side squared):
        images in [0, 1], latents ~N(0, 1), timesteps in [0, 300)."""
        rng = np.random.default_rng(seed)
        size = lr_size or (self.geometry.opt_side,) * 2
        out = {}
        for t in self.inputs:
            shape = (batch, *t.concrete(self.geometry, size))
            if t.name == "LR":
                x = rng.random(shape)
            elif t.name == "timestep":
                x = rng.integers(0, 300, shape)
            else:
                x = rng.standard_normal(shape)
            out[t.name] = x.astype(t.numpy_dtype)
        return out


def network_specs(
    latent_channels: int, geometry: Geometry = Geometry(), max_batch: int = 8
) -> dict[str, NetworkSpec]:
    """The three exported networks for ``latent_channels`` and the served ``geometry``."""
    lr = TensorSpec("LR", (1, -1, -1), grid="lr")

    def z(name: str) -> TensorSpec:
        return TensorSpec(name, (latent_channels, -1, -1), grid="latent")

    opt = max(1, max_batch // 2)
    kw = {"opt_batch": opt, "max_batch": max_batch, "geometry": geometry}
    return {
        "vae_encoder": NetworkSpec("vae_encoder", (lr,), (z("z_lr"),), **kw),
        "unet": NetworkSpec(
            "unet",
            (z("x_t"), TensorSpec("timestep", (1,)), z("z_lr")),
            (z("model_output"),),
            **kw,
        ),
        "vae_decoder": NetworkSpec(
            "vae_decoder",
            (z("z"), lr),
            (TensorSpec("SR", (1, -1, -1), grid="sr"),),
            **kw,
        ),
    }
