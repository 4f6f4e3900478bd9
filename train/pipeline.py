"""The offline pipeline, once: LR -> vae_encoder -> ``cxr_sr.sample`` over the unet ->
vae_decoder -> SR, with torch modules or with onnxruntime sessions on the exported graphs.

It is the loop the Triton ``sampler`` model runs (``cxr_sr.sample``, per-row noise keyed by
seed, row and latent position as ``cxr_sr.noise.noise_keys`` makes it), on the graphs the
server runs (``builders.graphs``: the encoder pads the LR to the multiple the networks need,
the decoder crops back), so offline scores and timings describe the served model, at any
size and for tiles (``origin``). Used by ``train.evaluate`` (and through it ``train.ablate``),
the training loop's validation samples and ``benchmarks.stages``.

Both backends take and return numpy float32 arrays:

    encode_lr  LR [N, 1, H, W] in [0, 1]            -> z_lr [N, C, h, w] (padded sides)
    denoise    x_t [N, C, h, w], t [N], z_lr        -> model output [N, C, h, w]
    decode     z [N, C, h, w], LR [N, 1, H, W]      -> SR [N, 1, 4H, 4W] in [0, 1]

Network names come from ``builders.specs.NETWORKS``; graphs are fed by position, in the order
of the specs (encoder: LR; unet: x_t, timestep [N, 1], z_lr; decoder: z, LR).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cxr_sr import SamplingOptions, Schedule, sample
from cxr_sr.builders.graphs import graphs, vae_factor
from cxr_sr.builders.specs import NETWORKS
from cxr_sr.noise import legacy_block, noise_keys
from cxr_sr.ort_cpu import DEFAULT_SPIN_MODE
from cxr_sr.sampling import latent_origin

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class Pipeline:
    """encoder -> sampling loop over the denoiser -> decoder; subclasses give the networks
    and ``vae_factor`` (image pixels per latent pixel, which places a tile's noise)."""

    vae_factor: int = 4

    def encode_lr(self, lr: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def denoise(self, x_t: np.ndarray, t: np.ndarray, z_lr: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def decode(self, z: np.ndarray, lr: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def latent(
        self,
        lr: np.ndarray,
        schedule: Schedule,
        options: SamplingOptions,
        seed: int = 0,
        origin: tuple[int, int] = (0, 0),
    ) -> np.ndarray:
        """The sampled HR latent for ``lr`` (rows keyed as the server keys them; ``origin``:
        the LR's top-left pixel in the image it is a tile of, as the request parameters
        ``origin_y``, ``origin_x``)."""
        z_lr = self.encode_lr(lr)
        f = self.vae_factor
        keys = noise_keys([seed], [len(lr)], [latent_origin(origin, f)], legacy_block(f))
        return sample(self.denoise, z_lr, schedule, options, keys)

    def super_resolve(
        self,
        lr: np.ndarray,
        schedule: Schedule,
        options: SamplingOptions,
        seed: int = 0,
        origin: tuple[int, int] = (0, 0),
    ) -> np.ndarray:
        """LR [N, 1, H, W] -> SR [N, 1, 4H, 4W] in [0, 1], float32."""
        return self.decode(self.latent(lr, schedule, options, seed, origin), lr)


class TorchPipeline(Pipeline):
    """A ``train.models.ResidualVAE`` and ``Denoiser`` on ``device`` (no gradients), run
    through the served graphs' modules (``builders.graphs``)."""

    def __init__(self, rvae, denoiser: torch.nn.Module, device: torch.device | str = "cpu"):
        self.rvae, self.denoiser, self.device = rvae, denoiser, torch.device(device)
        if rvae is not None:
            self.vae_factor = vae_factor(rvae)
            self._graphs = graphs(rvae, denoiser)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    @torch.no_grad()
    def encode_lr(self, lr: np.ndarray) -> np.ndarray:
        return self._graphs["vae_encoder"](self._tensor(lr)).float().cpu().numpy()

    @torch.no_grad()
    def denoise(self, x_t: np.ndarray, t: np.ndarray, z_lr: np.ndarray) -> np.ndarray:
        out = self.denoiser(self._tensor(x_t), self._tensor(t), self._tensor(z_lr))
        return out.float().cpu().numpy()

    @torch.no_grad()
    def decode(self, z: np.ndarray, lr: np.ndarray) -> np.ndarray:
        out = self._graphs["vae_decoder"](self._tensor(z), self._tensor(lr))
        return out.float().cpu().numpy()


def torch_denoiser(
    denoiser: torch.nn.Module, device: torch.device | str = "cpu"
) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    """A :class:`train.models.Denoiser` as the numpy callable ``cxr_sr.sample`` takes."""
    return TorchPipeline(None, denoiser, device).denoise


@torch.no_grad()
def super_resolve(
    rvae,
    denoiser: torch.nn.Module,
    schedule: Schedule,
    options: SamplingOptions,
    lr: torch.Tensor,
    seed: int = 0,
) -> torch.Tensor:
    """:class:`TorchPipeline` on a tensor: LR [N, 1, H, W] -> SR tensor on ``lr``'s device."""
    pipe = TorchPipeline(rvae, denoiser, lr.device)
    sr = pipe.super_resolve(lr.float().cpu().numpy(), schedule, options, seed)
    return torch.from_numpy(sr).to(lr.device)


def find_graph(folder: str | Path, name: str) -> Path:
    """``<name>.onnx`` (a builders ONNX folder) or ``<name>/1/model.onnx`` (a repository)."""
    folder = Path(folder)
    for cand in (
        folder / f"{name}.onnx",
        folder / name / "1" / "model.onnx",
        folder / name / "model.onnx",
    ):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"{folder}: no ONNX graph for {name!r} (run `python -m cxr_sr.builders.build` first)"
    )


def cpu_session(path: str | Path, threads: int = 0, spinning: str | bool = DEFAULT_SPIN_MODE):
    """An onnxruntime CPU session with onnxruntime's own memory settings (its arena, memory
    patterns on). ``threads``: intra-op threads (0 = onnxruntime's default, as served);
    ``spinning`` (``cxr_sr.ort_cpu.spin_mode``): ``run`` lets idle intra-op threads busy-wait
    only while a call runs, ``off`` never, which matters when several sessions share a CPU."""
    from cxr_sr.ort_cpu import session

    return session(path, threads, spinning=spinning, mem_pattern=True, shared_arena=False)


class OnnxPipeline(Pipeline):
    """The three exported graphs in ``folder`` on onnxruntime's CPU provider, each a
    ``cxr_sr.ort_cpu.CpuNetwork`` as the served ``cpu`` target runs them: ``lanes`` > 1
    spreads a batch over parallel calls, ``max_pixels`` caps one call (None: no cap).
    ``spinning`` (``cxr_sr.ort_cpu.spin_mode``): the default ``run`` lets a session's idle
    threads busy-wait only while it runs a call; ``on`` (onnxruntime's default) keeps the idle
    sessions' pools spinning between calls, taking CPU from the busy one (LR 64 UNet + decoder
    on 2 cores: ~99 ms against ~55 with ``run`` and ~59 with ``off``). The VAE factor comes
    from the encoder graph's metadata (``builders.export``)."""

    def __init__(
        self,
        folder: str | Path,
        threads: int = 0,
        spinning: str | bool = DEFAULT_SPIN_MODE,
        *,
        lanes: int = 1,
        max_pixels: int | None = None,
    ):
        self._settings = {
            "threads": threads,
            "lanes": lanes,
            "max_pixels": max_pixels,
            "spinning": spinning,
            "mem_pattern": True,
        }
        self.networks = {name: self._network(find_graph(folder, name)) for name in NETWORKS}
        meta = self.networks[NETWORKS[0]].session.get_modelmeta().custom_metadata_map
        if "vae_factor" not in meta:
            raise ValueError(
                f"{folder}: the ONNX graphs predate any-size serving (no vae_factor in their "
                "metadata); rebuild them with `python -m cxr_sr.builders.build`"
            )
        self.vae_factor = int(meta["vae_factor"])
        self._names = {n: net.input_names for n, net in self.networks.items()}
        t_input = self.networks[NETWORKS[1]].session.get_inputs()[1]
        self._t_dtype = ORT_DTYPES.get(t_input.type, np.float32)

    def _network(self, path: str | Path):
        from cxr_sr.ort_cpu import CpuNetwork

        return CpuNetwork(path, **self._settings)

    def use_graph(self, name: str, path: str | Path) -> None:
        """Run network ``name`` from the graph at ``path`` (same inputs and outputs, e.g. a
        quantized variant) with this pipeline's settings."""
        old, self.networks[name] = self.networks[name], self._network(path)
        old.close()

    @property
    def sessions(self) -> dict:
        """Each network's full session (one call, all its threads), by network name."""
        return {name: net.session for name, net in self.networks.items()}

    def input_names(self, name: str) -> list[str]:
        """Network ``name``'s input names, in the order :meth:`run` takes them."""
        return list(self._names[name])

    def run(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        """The first output of network ``name``, inputs in the order of its spec."""
        feeds = dict(zip(self._names[name], arrays, strict=True))
        return self.networks[name].run(None, feeds)[0]

    def encode_lr(self, lr: np.ndarray) -> np.ndarray:
        return self.run(NETWORKS[0], _f32(lr))

    def denoise(self, x_t: np.ndarray, t: np.ndarray, z_lr: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=self._t_dtype).reshape(len(x_t), 1)
        return self.run(NETWORKS[1], _f32(x_t), t, _f32(z_lr))

    def decode(self, z: np.ndarray, lr: np.ndarray) -> np.ndarray:
        return self.run(NETWORKS[2], _f32(z), _f32(lr))
