"""A browser viewer for the super-resolution service (Starlette + uvicorn; no torch).

``cxr-sr-viewer`` (``python -m cxr_sr.client.viewer``) serves one page on 127.0.0.1: upload a
PNG/JPEG/TIFF/DICOM image, see LR (nearest-neighbour), bicubic and SR at the same size with a
split slider, synchronised zoom and pan and window/level on the 16-bit pixels, score it at
native scale, download the SR. Every asset is in ``static/``; nothing is fetched from
elsewhere.

- ``viewer.jobs``: the work (read, protocol, upscale, metrics), one job at a time;
- ``viewer.app``: the Starlette app, ``create_app(ViewerConfig(...))``;
- ``viewer.cli``: the command line, which can start a local tritonserver.
"""

from cxr_sr.client.viewer.app import ViewerConfig, create_app

__all__ = ["ViewerConfig", "create_app"]
