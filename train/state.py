"""Everything a resume needs, and how it is saved and restored.

Resumable state lives in ``<out>/state/state.pt``: weights, optimizer, LR schedule, EMA,
GradScaler, every RNG, the data position, stage and step. Restoring all of it (and drawing
nothing from the RNGs in between) is what makes a resumed run continue bit for bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cxr_sr.train.config import StageConfig
from cxr_sr.train.ema import EMA

STAGES = ("vae", "unet", "done")
# keys that may change between a run and its resume without breaking exactness
RESUME_MUTABLE = (
    "device",
    "out",
    "num_workers",
    "sampling",
    "steps",
    "ckpt_every",
    "log_every",
    "sample_every",
    "sample_count",
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def autocast(device: torch.device, amp: str):
    if amp == "no":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs CUDA (GradScaler); use amp=bf16 on CPU")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params, stage: StageConfig, log: Callable[[str], None]):
    kwargs = dict(lr=stage.lr, weight_decay=stage.weight_decay, betas=tuple(stage.betas))
    if stage.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            log("optimizer adamw8bit: bitsandbytes is not importable; falling back to torch AdamW")
    return torch.optim.AdamW(params, **kwargs)


def make_lr_schedule(optimizer, stage: StageConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if stage.warmup_steps and step < stage.warmup_steps:
            return (step + 1) / stage.warmup_steps
        if stage.cosine and stage.steps > stage.warmup_steps:
            frac = (step - stage.warmup_steps) / (stage.steps - stage.warmup_steps)
            return 0.5 * (1.0 + np.cos(np.pi * min(frac, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state(gen: torch.Generator) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "train": gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    gen.set_state(state["train"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> torch.Generator:
    """Seed the global RNGs (library code may use them) and return the training generator."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed + 1)


def atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def check_resume_config(saved: dict, current: dict, prefix: str = "") -> None:
    """Raise if a setting that decides the trajectory changed between run and resume."""
    for key in sorted(set(saved) | set(current)):
        path = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if key in RESUME_MUTABLE:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            check_resume_config(a, b, path + ".")
        elif a != b:
            raise ValueError(f"cannot resume: {path} changed from {a!r} to {b!r}")


@dataclasses.dataclass
class Optimization:
    """The optimizer side of one stage: optimizer, LR schedule, EMA and GradScaler."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None
    scaler: torch.amp.GradScaler

    @classmethod
    def build(
        cls, model: torch.nn.Module, stage: StageConfig, log: Callable[[str], None]
    ) -> Optimization:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, stage, log)
        sched = make_lr_schedule(optimizer, stage)
        ema = EMA(model, stage.ema_decay) if stage.ema_decay > 0 else None
        scaler = torch.amp.GradScaler("cuda", enabled=stage.amp == "fp16")
        return cls(params, optimizer, sched, ema, scaler)

    def load(self, model: torch.nn.Module, state: dict, gen: torch.Generator) -> tuple[int, int]:
        """Restore a stage saved by :meth:`state_dict`; returns (step, position)."""
        model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"], gen)
        return state["step"], state["position"]

    def state_dict(self, model: torch.nn.Module, gen: torch.Generator) -> dict:
        return dict(
            model=model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            lr_schedule=self.lr_schedule.state_dict(),
            scaler=self.scaler.state_dict(),
            ema=self.ema.state_dict() if self.ema else None,
            rng=rng_state(gen),
        )

    def step(self, model: torch.nn.Module, grad_clip: float) -> None:
        """Clip, step the optimizer, the scaler and the LR schedule, then update the EMA."""
        if grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        if self.ema is not None:
            self.ema.update(model)

    def last_lr(self) -> float:
        return self.lr_schedule.get_last_lr()[0]
