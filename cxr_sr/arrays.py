"""The few array operations the sampler needs, for numpy, torch and CuPy arrays alike.

The core stays numpy-only as a dependency: an array's library is found from its type
(``type(x).__module__``) among the modules already imported, never imported here. So the
sampling loop (:func:`cxr_sr.sampling.sample`) runs on numpy arrays on the CPU and, unchanged,
on torch tensors (CPU or CUDA) or CuPy arrays handed over by DLPack, keeping its state on
their device.

Everything else the loop does is written with operators and methods the three share
(``+ - * /``, ``.shape``, ``.reshape``, ``.sum``, indexing with a list of rows).
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

# numpy.ndarray, torch.Tensor or cupy.ndarray: the sampler's state and the denoiser's I/O
Array = Any

_LIBRARIES = ("numpy", "torch", "cupy")


def namespace(x: Array) -> ModuleType:
    """The library of array ``x``: numpy, torch or cupy (found, not imported: an array of
    that type exists, so its library is loaded); TypeError for anything else."""
    root = type(x).__module__.split(".")[0]
    if root not in _LIBRARIES or root not in sys.modules:
        raise TypeError(
            f"expected a numpy array, torch tensor or CuPy array, got {type(x).__qualname__}"
        )
    return sys.modules[root]


def astype(x: Array, dtype: str) -> Array:
    """``x`` as ``dtype`` ("float32", "float64"), on its own device; no copy when it already
    is."""
    if namespace(x) is np or not hasattr(x, "to"):
        return x.astype(dtype, copy=False)
    return x.to(getattr(sys.modules["torch"], dtype))


def to_numpy(x: Array) -> np.ndarray:
    """A host numpy copy (or view) of ``x``."""
    xp = namespace(x)
    if xp is np:
        return x
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().numpy()
    return x.get()  # cupy


def from_numpy(a: np.ndarray, like: Array) -> Array:
    """Host array ``a`` moved to the library and device of ``like`` (its dtype kept)."""
    xp = namespace(like)
    if xp is np:
        return a
    if hasattr(like, "device") and hasattr(like, "to"):  # torch
        return xp.from_numpy(np.ascontiguousarray(a)).to(like.device)
    return xp.asarray(a)  # cupy: to the current device


def full(n: int, value: float, like: Array) -> Array:
    """float32 [n] filled with ``value``, in the library and on the device of ``like``."""
    xp = namespace(like)
    if xp is not np and hasattr(like, "to"):  # torch: made on the device, no host copy
        return xp.full((n,), float(value), dtype=xp.float32, device=like.device)
    return from_numpy(np.full((n,), value, dtype=np.float32), like)
