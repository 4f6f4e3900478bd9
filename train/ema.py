"""Exponential moving average of a model's weights (Polyak averaging; used by DDPM, Ho et al.
2020, sec. 4, with decay 0.9999). The final checkpoint holds the averaged weights."""

from __future__ import annotations

import torch


class EMA:
    """Shadow copy of every floating-point parameter and buffer of ``model``.

    The effective decay warms up as min(decay, (1 + k) / (10 + k)) after k updates, so short
    runs are not dominated by the initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(d).add_(v.detach().to(s.dtype), alpha=1.0 - d)
            else:
                s.copy_(v)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
