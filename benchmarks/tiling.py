"""The client's row of the cost table: an image larger than the server takes, through
``SRClient.upscale`` (overlapping tiles, one request each, blended back).

``benchmarks.cost`` calls :func:`tiling_rows` after its server rows, so the row lands in
``outputs/bench.json`` with the same timing (:func:`benchmarks.cost.time_case`: latency,
output megapixels per second, ms per output MP) plus the tile plan. The input is a
``side`` x ``side`` square of the bundled radiograph at its own pixels (what a user with an
archived 512 px radiograph sends; a chest phantom where pydicom-data is absent), and the
output is 4x its side.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.common import lr_crops
from benchmarks.cost import time_case
from cxr_sr.client import SRClient, read_image
from cxr_sr.client.triton import DEFAULT_IN_FLIGHT
from cxr_sr.imaging import SCALE, center_square

TILING_SIDE = 512  # issue 9: a 512x512 input through the client's tiling


def input_image(side: int = TILING_SIDE) -> np.ndarray:
    """A ``side`` x ``side`` radiograph, float32 in [0, 1]: the centred square of the bundled
    RG1_UNCI.dcm at its own pixels, cut to ``side`` (or a phantom-based crop without it)."""
    try:
        from pydicom.data import get_testdata_file

        path = get_testdata_file("RG1_UNCI.dcm")
    except ImportError:
        path = None
    if path is None:
        return lr_crops(side, 1)[0, 0]
    square = center_square(read_image(path))
    if square.shape[0] < side:
        return lr_crops(side, 1)[0, 0]
    top = (square.shape[0] - side) // 2
    return np.ascontiguousarray(square[top : top + side, top : top + side])


def tiling_rows(
    url: str,
    params: Mapping[str, Any],
    runs: int,
    warmup: int,
    side: int = TILING_SIDE,
    protocol: str = "grpc",
    in_flight: int = DEFAULT_IN_FLIGHT,
) -> list[dict[str, Any]]:
    """One cost row: ``SRClient(url).upscale`` of a ``side`` x ``side`` image, timed by
    :func:`benchmarks.cost.time_case` (``warmup`` untimed, ``runs`` timed calls), with the
    tile plan (tiles, tile side) and the requests in flight (the client's default: see
    ``cxr_sr.client.triton.DEFAULT_IN_FLIGHT``)."""
    image = input_image(side)
    with SRClient(url, protocol=protocol, in_flight=in_flight) as client:
        plan = client.tile_plan(side, side)
        row = time_case(
            f"{side}x{side} via client tiling",
            lambda: client.upscale(image, **params),
            (SCALE * side) ** 2,
            runs,
            warmup,
            lr_side=side,
            path="client",
            tiles=len(plan),
            tile_side=plan.tile_h,
            in_flight=client.in_flight,
        )
    print(
        f"[cost] {side}x{side} via client tiling ({len(plan)} tiles of {plan.tile_h}): "
        f"{row['latency_ms']:.0f} ms, {row['mp_per_s']:.2f} MP/s",
        flush=True,
    )
    return [row]
