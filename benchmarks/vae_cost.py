"""What the VAE stages cost per output pixel: the first version's VAE against a checkpoint's.

    python -m benchmarks.vae_cost --checkpoint weights/demo --out outputs/vae_cost.json

Both run in this one process, side by side, on the same inputs: each network is exported to
ONNX (the served graphs of ``cxr_sr.builders.export``) at a fixed LR size and timed in
onnxruntime (batch 1, ``--threads`` intra-op threads, median of ``--repeats`` calls after
warm-up), for every LR side in ``--sizes``. Timing does not depend on weight values, so the
first version is rebuilt from its architecture (``FIRST_VERSION``, random weights) rather
than needing its weights.

Also reported: the parameter count, and the memory of the largest attention matrix each
architecture would need per image at each size (a whole-latent self-attention is quadratic
in pixels; the first version's needs 16 GiB at LR 256), for the VAE and the UNet.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    benchmark_parser,
    describe,
    device_info,
    software_versions,
    table,
    write_json,
)
from cxr_sr.builders.graphs import DecoderGraph, EncoderGraph, attention_bytes
from cxr_sr.train import checkpoint as ckpt_io
from cxr_sr.train.models import ResidualVAE, VAEConfig, build_vae
from cxr_sr.train.pipeline import cpu_session

# The first version's demo VAE: f=4, channels 24-48-48, mid-block self-attention over the
# whole latent in encoder and decoder, z_lr = VAE encoder of bicubic(LR) at 4x the LR side.
FIRST_VERSION = VAEConfig(
    channels=[24, 48, 48], latent_channels=4, residual_scale=10.0, mid_attention=True, lr_encoder=[]
)


def first_version_vae() -> ResidualVAE:
    torch.manual_seed(0)
    cfg = FIRST_VERSION
    return ResidualVAE(build_vae(cfg), 1.0, cfg.residual_scale, cfg.residual).eval()


def _session(module: torch.nn.Module, args: tuple, names: list[str], threads: int):
    path = Path(tempfile.mkdtemp()) / "graph.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        # the same harmless tracer notes as cxr_sr.builders.export silences
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        torch.onnx.export(
            module,
            args,
            path,
            input_names=names,
            output_names=["y"],
            opset_version=17,
            dynamo=False,
        )
    return cpu_session(path, threads, spinning="off")


def _median_ms(session, feeds: dict, repeats: int) -> float:
    for _ in range(2):
        session.run(None, feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def measure(vae: ResidualVAE, lr_side: int, threads: int, repeats: int) -> dict[str, float]:
    lr = torch.from_numpy(np.random.default_rng(0).random((1, 1, lr_side, lr_side), np.float32))
    with torch.no_grad():
        z = vae.encode_lr(lr)
    encoder = _session(EncoderGraph(vae).eval(), (lr,), ["LR"], threads)
    decoder = _session(DecoderGraph(vae).eval(), (z, lr), ["z", "LR"], threads)
    enc = _median_ms(encoder, {"LR": lr.numpy()}, repeats)
    dec = _median_ms(decoder, {"z": z.numpy(), "LR": lr.numpy()}, repeats)
    mp = (4 * lr_side) ** 2 / 1e6
    return {
        "encoder_ms": enc,
        "decoder_ms": dec,
        "total_ms": enc + dec,
        "ms_per_mp": (enc + dec) / mp,
    }


def main(argv: list[str] | None = None) -> int:
    p = benchmark_parser("vae_cost", __doc__)
    p.add_argument(
        "--checkpoint", type=Path, default=Path("weights/demo"), help="checkpoint to compare"
    )
    p.add_argument("--sizes", default="64,128", help="LR sides, comma-separated (output = 4x)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per case")
    p.add_argument("--out", type=Path, default=Path("outputs/vae_cost.json"), help="JSON report")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    ckpt = ckpt_io.load(args.checkpoint)
    models = {"first version": first_version_vae(), str(args.checkpoint): ckpt.vae}
    rows, cases = [], []
    for side in sizes:
        for name, vae in models.items():
            m = measure(vae, side, args.threads, args.repeats)
            unet = None if name == "first version" else ckpt.denoiser
            att = attention_bytes(vae, unet, side)
            params = sum(p.numel() for p in vae.parameters())
            cases.append(
                {"model": name, "lr_side": side, "params": params, **m, "attention_bytes": att}
            )
            rows.append(
                [
                    name,
                    f"{side} -> {4 * side}",
                    params / 1e6,
                    m["encoder_ms"],
                    m["decoder_ms"],
                    m["total_ms"],
                    m["ms_per_mp"],
                    att["vae"] / 2**30,
                ]
            )
    ratios = {}
    for side in sizes:
        old, new = (c["total_ms"] for c in cases if c["lr_side"] == side)
        ratios[str(side)] = old / new
    device, versions = device_info(), software_versions()
    print(describe(device, versions))
    print(
        table(
            [
                "VAE",
                "LR -> SR",
                "params M",
                "encoder ms",
                "decoder ms",
                "total ms",
                "ms / output MP",
                "VAE attention GiB",
            ],
            rows,
        )
    )
    print(
        "first version / new, encoder + decoder: "
        + ", ".join(f"LR {k}: {v:.2f}x" for k, v in ratios.items())
    )
    for side in (256, 512):
        att = attention_bytes(ckpt.vae, ckpt.denoiser, side)
        old = attention_bytes(models["first version"], None, side)
        print(
            f"attention per image at LR {side}: first-version VAE {old['vae'] / 2**30:.1f} GiB; "
            f"new VAE {att['vae'] / 2**30:.1f} GiB; UNet {att['unet'] / 2**30:.2f} GiB"
        )
    write_json(
        args.out,
        {
            "device": device,
            "versions": versions,
            "threads": args.threads,
            "cases": cases,
            "speedup": ratios,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
