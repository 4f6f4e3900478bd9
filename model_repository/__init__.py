"""Sources of the Triton Python models (``sampler/1/model.py``, ``onnx_python/model.py``).

Shipped as package data so that ``cxr-sr-build`` works from a non-editable install;
``cxr_sr.builders.build`` copies them into the repositories it writes.
"""

from pathlib import Path

SOURCES = Path(__file__).resolve().parent
