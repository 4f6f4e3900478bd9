"""Shared diffusion math for the chest X-ray super-resolution service (numpy only).

One definition of the noise schedule, the timestep plans and the sampler steps, imported
by training (`train/`), the builders, the tests and the Triton `sampler` model. Nothing
here imports torch, so the light client and the Python backend can use it.
"""

from cxr_sr.sampling import SAMPLERS, SamplingOptions, sample, timesteps
from cxr_sr.schedule import PREDICTIONS, SCHEDULES, Schedule

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "SamplingOptions",
    "Schedule",
    "sample",
    "timesteps",
]
