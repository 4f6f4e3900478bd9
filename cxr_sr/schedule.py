"""The noise schedule and the model parameterization, defined once.

Notation (Ho et al. 2020, "DDPM", eq. 4; Song et al. 2021, "DDIM", eq. 12):

    ========  ===============================================================
    T         number of training timesteps, t in {0, ..., T-1}
    beta_t    variance added at step t
    abar_t    prod_{s<=t} (1 - beta_s)  ("alphas_cumprod" in diffusers)
    x_t       sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,  eps ~ N(0, I)
    v_t       sqrt(abar_t) * eps - sqrt(1 - abar_t) * x_0   (Salimans & Ho 2022)
    ========  ===============================================================

The schedule is stored next to the weights as ``scheduler/scheduler_config.json`` with
the key names of diffusers' ``DDPMScheduler`` (so that scheduler can be built from the same
file), plus one key of ours, ``snr_shift``. Tables are computed in float64.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine")


def _sqrt(x):
    """np.sqrt for numpy values; the array's own ``.sqrt()`` otherwise (no torch import)."""
    return x.sqrt() if hasattr(x, "sqrt") else np.sqrt(x)


PREDICTIONS = ("eps", "v", "x0")

# our names <-> diffusers' names
_TO_DIFFUSERS_SCHEDULE = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}
_TO_DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


@dataclass(frozen=True)
class Schedule:
    """A discrete-time Gaussian diffusion.

    Args:
        kind: ``linear`` (DDPM), ``scaled_linear`` (latent diffusion) or ``cosine``
            (Nichol & Dhariwal 2021, eq. 17).
        num_train_timesteps: T.
        beta_start, beta_end: endpoints of the linear schedules (ignored by ``cosine``).
        prediction: what the network predicts: ``eps``, ``v`` or ``x0``.
        snr_shift: rebalances the schedule by scaling the signal-to-noise ratio,
            SNR'(t) = snr_shift**2 * SNR(t) (Hoogeboom et al. 2023, "simple diffusion",
            sec. 3.1). Values below 1 spend more steps at high noise; 1 leaves it unchanged.
    """

    kind: str = "linear"
    num_train_timesteps: int = 300
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: str = "x0"
    snr_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be one of {SCHEDULES}, got {self.kind!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.snr_shift <= 0:
            raise ValueError(f"snr_shift must be > 0, got {self.snr_shift}")

    # -- tables -----------------------------------------------------------------------
    def betas(self) -> np.ndarray:
        """beta_t, shape [T], float64."""
        T = self.num_train_timesteps
        if self.kind == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        elif self.kind == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=np.float64) ** 2
        else:  # cosine: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008, beta <= 0.999
            f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(T)], dtype=np.float64)
        if self.snr_shift != 1.0:
            abar = np.cumprod(1.0 - betas)
            snr = abar / (1.0 - abar) * self.snr_shift**2
            abar = snr / (1.0 + snr)
            betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
        return betas

    def alphas_cumprod(self) -> np.ndarray:
        """abar_t, shape [T], float64."""
        return np.cumprod(1.0 - self.betas())

    # -- forward process --------------------------------------------------------------
    def q_sample(self, x0, eps, abar):
        """x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps, a draw from q(x_t | x0) (Ho et al.
        2020, eq. 4; diffusers' ``DDPMScheduler.add_noise`` given ``abar = alphas_cumprod[t]``).

        ``abar`` broadcasts against ``x0`` (a scalar, or e.g. shape [N, 1, 1, 1]). Numpy arrays,
        or any array type with a ``.sqrt()`` method (torch tensors, as in training); the result
        has the type the arithmetic gives (callers cast).
        """
        return _sqrt(abar) * x0 + _sqrt(1.0 - abar) * eps

    # -- parameterization -------------------------------------------------------------
    def split(self, x_t: np.ndarray, abar: np.ndarray, model_output: np.ndarray):
        """Return (x0_hat, eps_hat) from the network output, whatever it predicts.

        ``abar`` broadcasts against ``x_t`` (e.g. shape [N, 1, 1, 1]). Numpy arrays, or any
        array type with a ``.sqrt()`` method (torch tensors: training uses this with autograd);
        numpy inputs go through ``np.sqrt`` exactly as before.
        """
        a, s = _sqrt(abar), _sqrt(1.0 - abar)
        if self.prediction == "eps":
            eps = model_output
            x0 = (x_t - s * eps) / a
        elif self.prediction == "x0":
            x0 = model_output
            eps = (x_t - a * x0) / s
        else:  # v
            x0 = a * x_t - s * model_output
            eps = a * model_output + s * x_t
        return x0, eps

    def target(self, x0: np.ndarray, eps: np.ndarray, abar: np.ndarray) -> np.ndarray:
        """The training target of the network for this parameterization (numpy or torch, as
        :meth:`split`)."""
        if self.prediction == "eps":
            return eps
        if self.prediction == "x0":
            return x0
        return _sqrt(abar) * eps - _sqrt(1.0 - abar) * x0

    # -- persistence ------------------------------------------------------------------
    def to_diffusers_config(self) -> dict:
        """The ``scheduler_config.json`` content (diffusers' DDPMScheduler keys + ours)."""
        return {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": _TO_DIFFUSERS_SCHEDULE[self.kind],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": _TO_DIFFUSERS_PREDICTION[self.prediction],
            "clip_sample": False,
            "variance_type": "fixed_small",
            "timestep_spacing": "trailing",
            "snr_shift": self.snr_shift,
        }

    @classmethod
    def from_diffusers_config(cls, config: dict) -> Schedule:
        kinds = {v: k for k, v in _TO_DIFFUSERS_SCHEDULE.items()}
        preds = {v: k for k, v in _TO_DIFFUSERS_PREDICTION.items()}
        try:
            kind, prediction = kinds[config["beta_schedule"]], preds[config["prediction_type"]]
        except KeyError as err:
            raise ValueError(f"unsupported scheduler config value: {err}") from None
        return cls(
            kind=kind,
            num_train_timesteps=int(config["num_train_timesteps"]),
            beta_start=float(config.get("beta_start", 1e-4)),
            beta_end=float(config.get("beta_end", 0.02)),
            prediction=prediction,
            snr_shift=float(config.get("snr_shift", 1.0)),
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/scheduler_config.json``; returns its path."""
        path = Path(folder) / "scheduler_config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_diffusers_config(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Schedule:
        """Read ``folder/scheduler_config.json`` (a checkpoint's ``scheduler/`` folder)."""
        path = Path(folder)
        if path.is_dir():
            path = path / "scheduler_config.json"
        return cls.from_diffusers_config(json.loads(path.read_text()))

    def as_dict(self) -> dict:
        return asdict(self)
