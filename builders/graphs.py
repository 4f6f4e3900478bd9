"""The served stages as torch modules: what the exported graphs compute, and what the offline
torch pipeline (``train.pipeline.TorchPipeline``) runs, so the two cannot drift.

    vae_encoder  LR [N, 1, H, W] -> reflect-pad bottom/right to multiples of m
                 -> z_lr [N, C, h, w], h = SCALE * ceil(H / m) * m / f
    unet         (x_t, timestep [N, 1], z_lr) -> model_output, all [N, C, h, w]
    vae_decoder  (z, LR) -> decoder residual cropped to [4H, 4W] + bicubic(LR), clipped to [0, 1]

Any LR size is served: the UNet halves its input (levels - 1) times and the VAE (factor f)
maps 4H pixels to 4H / f latent pixels, so the pipeline needs LR sides that are multiples of
``m`` (:func:`lr_multiple`). The encoder pads the LR by reflection to the next multiple, the
sampler runs on the padded latent, and the decoder, which receives the LR too, crops the
residual back to 4x the LR's own size before adding bicubic(LR). A request whose sides are
already multiples of ``m`` (64x64) goes through padding and cropping of zero: its output is
exactly what it was before any-size serving. The noise of the padded margin is drawn at its
global position like any other (``cxr_sr.noise``) and the margin is cropped away.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from cxr_sr.imaging import LR_SIZE, SCALE, bicubic_phase_taps
from cxr_sr.serving import batch_bucket, chunk_rows, row_chunks


def vae_factor(rvae) -> int:
    """Image pixels per latent pixel (per side) of a ``train.models.ResidualVAE``."""
    return 2 ** (len(rvae.vae.config.block_out_channels) - 1)


def unet_factor(denoiser) -> int:
    """How many times the denoiser's UNet halves its input, as a factor (2 ** (levels - 1))."""
    return 2 ** (len(denoiser.unet.config.block_out_channels) - 1)


def lr_multiple(f: int, unet: int) -> int:
    """The LR side multiple the networks need: 4H must be a multiple of the VAE factor ``f``
    and the latent side 4H / f a multiple of the UNet factor (all powers of two)."""
    return max(1, f // SCALE, unet * f // SCALE)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of [N, C, H, W] to sides that are multiples of
    ``multiple`` (traced with the input's own sides, so one exported graph serves all)."""
    if multiple == 1:
        return x
    h, w = x.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")


class EncoderGraph(torch.nn.Module):
    """LR [N, 1, H, W] -> z_lr of the LR padded to multiples of ``multiple``
    (``ResidualVAE.encode_lr``: the LR encoder, or the VAE encoder of bicubic(LR))."""

    def __init__(self, rvae, multiple: int = 1):
        super().__init__()
        self.vae = rvae
        self.multiple = int(multiple)

    def forward(self, LR):
        return self.vae.encode_lr(pad_to_multiple(LR, self.multiple))


class UNetGraph(torch.nn.Module):
    """(x_t, timestep [N, 1], z_lr) -> model_output."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t, timestep, z_lr):
        return self.denoiser(x_t, timestep[:, 0], z_lr)


class Bicubic(torch.nn.Module):
    """``F.interpolate(mode="bicubic", align_corners=False)`` by an integer ``scale``, as an
    edge pad, one 5x5 convolution with a kernel per output phase, and a pixel shuffle.

    Same numbers as the interpolation (max abs diff ~4e-7, float rounding), but exported to
    ONNX as Pad -> Conv -> DepthToSpace instead of a cubic Resize, which onnxruntime's CPU
    kernel runs 30-45x slower (144 vs 3.1 ms for a 256x256 LR on 2 cores): a tenth of the
    decoder's time at LR 256. Single-channel input (the LR), as the decoder needs.
    """

    def __init__(self, scale: int = SCALE):
        super().__init__()
        taps = torch.from_numpy(bicubic_phase_taps(scale))  # [scale, 5]
        kernel = (taps[:, None, :, None] * taps[None, :, None, :]).reshape(-1, 1, 5, 5)
        self.register_buffer("kernel", kernel.float(), persistent=False)
        self.scale = int(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
        return F.pixel_shuffle(F.conv2d(padded, self.kernel.to(x.dtype)), self.scale)


class DecoderGraph(torch.nn.Module):
    """(z, LR) -> SR [N, 1, 4H, 4W] = clip(bicubic(LR) + residual(z)[:4H, :4W], 0, 1)."""

    def __init__(self, rvae):
        super().__init__()
        self.vae = rvae
        self.bicubic = Bicubic(SCALE)

    def forward(self, z, LR):
        decoded = self.vae.vae.decode(z / self.vae.scaling).sample
        h, w = LR.shape[-2:]
        decoded = decoded[:, :, : SCALE * h, : SCALE * w]
        base = self.bicubic(LR) if self.vae.is_residual else None
        return self.vae.image(decoded, LR, base=base).clamp(0.0, 1.0)


class _ExportAttention:
    """A diffusers attention processor for export: the stock processor's (``AttnProcessor2_0``)
    self-attention, with the softmax(q k^T / sqrt(d)) v core left to :meth:`core`.

    Only what these networks use: self-attention without mask, spatial norm or query/key
    norms; anything else is refused, not ignored.
    """

    def core(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int):
        """[N, T, heads * d] each -> [N, T, heads * d]."""
        raise NotImplementedError

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        unused = (
            encoder_hidden_states,
            attention_mask,
            attn.spatial_norm,
            attn.norm_q,
            attn.norm_k,
        )
        if any(x is not None for x in unused):
            raise NotImplementedError(
                f"{type(self).__name__}: self-attention only (no cross-attention, attention "
                "mask, spatial norm or query/key norm)"
            )
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            n, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(n, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        out = self.core(query, key, value, attn.heads).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(n, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, T, heads * d] -> [N, heads, T, d]."""
    return x.view(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[N, heads, T, d] -> [N, T, heads * d]."""
    n, heads, _, d = x.shape
    return x.transpose(1, 2).reshape(n, -1, heads * d)


class HeadwiseAttention(_ExportAttention):
    """The attention core one head at a time: the portable graph (any ONNX runtime, TensorRT).

    Exported as it is in the stock processor, the core becomes MatMul -> Softmax -> MatMul over
    all heads at once, so onnxruntime materialises every head's [tokens, tokens] score matrix
    together: 1.5 GiB per image for the UNet's mid block at LR 256 (24 heads x 4,096 tokens),
    and the softmax's output as much again. Head by head, only one head's matrix is alive at a
    time (64 MiB there), in a graph that is still dynamic in batch and sides, because the head
    count is a constant of the network. Heads are independent, so the result is the same, bit
    for bit on onnxruntime's CPU kernels (``tests/test_builders.py``).
    """

    def core(self, query, key, value, heads):
        query, key, value = (_split_heads(x, heads) for x in (query, key, value))
        out = torch.cat(
            [
                F.scaled_dot_product_attention(
                    query[:, i : i + 1], key[:, i : i + 1], value[:, i : i + 1]
                )
                for i in range(heads)
            ],
            dim=1,
        )
        return _merge_heads(out)


class _MultiHeadAttention(torch.autograd.Function):
    """The attention core as one node: computed by ``scaled_dot_product_attention`` in torch,
    exported as onnxruntime's contrib op ``com.microsoft.MultiHeadAttention`` (unscaled inputs
    [N, T, heads * d], the default 1 / sqrt(d) scale)."""

    @staticmethod
    def forward(ctx, query, key, value, heads: int):
        q, k, v = (_split_heads(x, heads) for x in (query, key, value))
        return _merge_heads(F.scaled_dot_product_attention(q, k, v))

    @staticmethod
    def symbolic(g, query, key, value, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads)
        return out.setType(query.type())  # same shape and type as the query


class FusedAttention(_ExportAttention):
    """The attention core as onnxruntime's ``com.microsoft.MultiHeadAttention``: the cpu
    target's graph. onnxruntime's CPU kernel computes it as flash attention, block by block,
    so no [tokens, tokens] matrix is ever whole (memory bounded as head by head) and the scores
    never go through main memory: the UNet at LR 256 takes ~1,050 instead of ~1,250 ms on 2
    cores. Only onnxruntime runs it (CPU and CUDA providers); TensorRT does not parse it, so
    the gpu target keeps :class:`HeadwiseAttention`. TorchScript exporter only."""

    def core(self, query, key, value, heads):
        return _MultiHeadAttention.apply(query, key, value, heads)


ATTENTION = {"headwise": HeadwiseAttention, "fused": FusedAttention}


def attention_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The diffusers ``Attention`` layers in ``module``."""
    from diffusers.models.attention_processor import Attention

    return [m for m in module.modules() if isinstance(m, Attention)]


@contextmanager
def export_attention(module: torch.nn.Module, kind: str = "headwise"):
    """Within the block, every diffusers ``Attention`` in ``module`` uses the ``kind``
    processor of :data:`ATTENTION`; their own processors are put back after it. Yields how
    many were swapped."""
    if kind not in ATTENTION:
        raise ValueError(f"attention kind must be one of {tuple(ATTENTION)}, got {kind!r}")
    found = attention_layers(module)
    saved = [m.processor for m in found]
    try:
        for m in found:
            m.set_processor(ATTENTION[kind]())
        yield len(found)
    finally:
        for m, processor in zip(found, saved, strict=True):
            m.set_processor(processor)


def graphs(rvae, denoiser) -> dict[str, torch.nn.Module]:
    """The three served networks of a checkpoint's modules, by network name, in eval mode."""
    m = lr_multiple(vae_factor(rvae), unet_factor(denoiser))
    return {
        "vae_encoder": EncoderGraph(rvae, m).eval(),
        "unet": UNetGraph(denoiser).eval(),
        "vae_decoder": DecoderGraph(rvae).eval(),
    }


@torch.no_grad()
def attention_bytes(
    rvae,
    denoiser=None,
    lr_side: int = LR_SIZE,
    probe_side: int = LR_SIZE,
    per_head: bool = False,
) -> dict[str, int]:
    """fp32 bytes of the largest attention matrix per image at an LR of ``lr_side`` squared,
    all heads together (``per_head``: one head's), per network (0 = no attention;
    ``denoiser`` None: the VAE only). Measured, not assumed: one forward pass at
    ``probe_side`` records every attention module's heads and token count, and token counts
    grow with the pixels: tokens(s) = tokens(probe) * (s / probe) ** 2."""
    from diffusers.models.attention_processor import Attention

    found: dict[str, int] = {}

    def hook(network: str):
        def record(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            tokens = x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]
            heads = 1 if per_head else module.heads
            found[network] = max(found.get(network, 0), heads * tokens**2)

        return record

    f = vae_factor(rvae)
    m = lr_multiple(f, unet_factor(denoiser) if denoiser is not None else 1)
    encoder, decoder = EncoderGraph(rvae, m).eval(), DecoderGraph(rvae).eval()
    handles = []
    for network, module in (("vae", rvae), ("unet", denoiser)):
        for sub in module.modules() if module is not None else ():
            if isinstance(sub, Attention):
                handles.append(sub.register_forward_hook(hook(network), with_kwargs=True))
    try:
        lr = torch.rand(1, 1, probe_side, probe_side)
        z = encoder(lr)
        if denoiser is not None:
            UNetGraph(denoiser).eval()(z, torch.zeros(1, 1), z)
        decoder(z, lr)
    finally:
        for h in handles:
            h.remove()
    ratio = (lr_side / probe_side) ** 2
    return {n: int(4 * found.get(n, 0) * ratio**2) for n in ("vae", "unet")}


HALF_INPUTS = {"vae_encoder": ("LR",), "unet": ("x_t", "timestep", "z_lr"), "vae_decoder": ("z",)}


class TorchStage:
    """One served network as the ``torch`` target runs it: ``stage(*inputs) -> float32``.

    ``half`` (meant for CUDA): fp16 weights and activations, the reference project's PyTorch
    fallback where no TensorRT plan exists. The encoder and the UNet run wholly in fp16; the
    decoder runs its VAE in fp16 but keeps the LR and so bicubic(LR) + residual in fp32 (an
    fp16 sum would quantise the output to 2**-11 near white, coarser than a 12-bit radiograph).
    Inputs are given in the order of the network's spec (``HALF_INPUTS`` names them).
    """

    def __init__(self, rvae, denoiser, network: str, device="cpu", half: bool = False):
        if network not in HALF_INPUTS:
            raise ValueError(f"network must be one of {tuple(HALF_INPUTS)}, got {network!r}")
        self.network, self.device, self.half = network, torch.device(device), bool(half)
        self.graph = graphs(rvae, denoiser)[network].to(self.device)
        if self.half:
            (rvae.vae if network == "vae_decoder" else self.graph).half()

    def cast(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """An input on this stage's device, fp16 where the stage takes it so."""
        want = torch.float16 if self.half and name in HALF_INPUTS[self.network] else torch.float32
        return x.to(self.device, want, non_blocking=True)

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        names = HALF_INPUTS[self.network] if self.network != "vae_decoder" else ("z", "LR")
        args = [self.cast(n, x) for n, x in zip(names, inputs, strict=True)]
        return self.graph(*args).float()


class GraphedStage:
    """A :class:`TorchStage` on CUDA replayed as one CUDA graph per input shape and dtype
    (captured on first use, warmed on a side stream first): inputs are copied into static
    buffers and one launch replays every kernel, so a small image no longer waits on Python
    launching hundreds of kernels. All of a stage's graphs draw their working memory from one
    pool: they replay one at a time on one stream, and each output is copied out at once, so
    the pool holds the largest graph's activations, not the sum of all (capture the largest
    shape first). Each shape keeps its input buffers and output; at most ``max_graphs`` shapes
    are captured, later shapes run eagerly."""

    def __init__(self, stage: TorchStage, max_graphs: int = 64):
        self.stage, self.max_graphs = stage, int(max_graphs)
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list, torch.Tensor]] = {}
        self.pool = None  # the graphs' shared memory pool, made at the first capture

    def _capture(self, inputs):
        static = [x.clone() for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.stage(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.stage(*static)
        return graph, static, out

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.stage(*inputs)
            self.graphs[key] = self._capture(inputs)
        graph, static, out = self.graphs[key]
        for buffer, x in zip(static, inputs, strict=True):
            buffer.copy_(x)
        graph.replay()
        return out.clone()


def run_in_calls(
    run: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    budget: int | None,
    max_batch: int,
    buckets: bool,
) -> torch.Tensor:
    """``run(*inputs)`` over a served batch, in calls of at most ``budget`` pixels (of the
    first input's last two sides) and ``max_batch`` rows, as the torch target's models and
    the fused sampler call their networks. With ``buckets`` each call runs at its bucket's size
    (``cxr_sr.serving.batch_bucket``, at most what one call takes): zero rows are appended
    and their results cut off, so a network sees a handful of batch sizes, not every size a
    dynamic batcher forms (on CUDA each new size costs cuDNN autotuning and a graph capture).
    Rows are independent, so the result does not depend on either."""
    rows, pixels = len(inputs[0]), int(inputs[0].shape[2:].numel())
    per = chunk_rows(pixels, budget, max_batch)
    outs = []
    for s in row_chunks(rows, pixels, budget, max_batch):
        part = [x[s] for x in inputs]
        n = len(part[0])
        size = batch_bucket(n, per) if buckets else n
        if size > n:
            part = [torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))]) for x in part]
        outs.append(run(*part)[:n])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def bucket_sizes(pixels: int, budget: int | None, max_batch: int) -> list[int]:
    """The batch sizes :func:`run_in_calls` runs with buckets, for rows of ``pixels`` pixels,
    largest first (the order to warm CUDA graphs that share one memory pool)."""
    per = chunk_rows(pixels, budget, max_batch)
    return sorted({batch_bucket(n, per) for n in range(1, per + 1)}, reverse=True)
