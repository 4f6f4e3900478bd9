"""The optimisation loop of one training stage, shared by the VAE and the denoiser stage.

``StageTrainer`` follows improved-diffusion's TrainLoop: ``run_loop`` -> ``run_step`` ->
``forward_backward``, and ``save``. Multi-GPU: each process takes its slice of every global
batch from ``make_loader``, and accelerate wraps the model and optimizer (DDP).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cxr_sr.train.batches import DevicePool, make_loader
from cxr_sr.train.config import StageConfig, TrainConfig
from cxr_sr.train.state import STAGES, Optimization, atomic_save, autocast

# -- one process's run ---------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """Everything the two stages share within one process."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    accelerator: object
    gen: torch.Generator
    writer: object | None
    log: Callable[[str], None]
    progress: bool
    stop_after: int | None
    steps_taken: int = 0  # optimizer steps in this process (for stop_after)
    pool: DevicePool | None = None  # cfg.device_items pairs on the device, shared by both stages

    def batches(self, dataset: Dataset, batch_size: int, salt: int, start: int) -> Iterator:
        """The training batches of a stage: from the loader, or (``device_items`` > 0) drawn
        from the pairs held on the device."""
        cfg, acc = self.cfg, self.accelerator
        where = dict(start=start, rank=acc.process_index, world=acc.num_processes)
        if not cfg.device_items:
            return make_loader(
                dataset, batch_size, cfg.seed, salt=salt, num_workers=cfg.num_workers, **where
            )
        if self.pool is None:
            t0 = time.perf_counter()
            self.pool = DevicePool.draw(
                dataset, cfg.device_items, self.device, cfg.seed, cfg.num_workers
            )
            self.log(
                f"{len(self.pool)} training pairs held on {self.device} "
                f"({self.pool.hr.nbytes / 2**30:.2f} GiB, {time.perf_counter() - t0:.0f} s)"
            )
        return self.pool.batches(batch_size, cfg.seed, salt, **where)

    @property
    def state_path(self) -> Path:
        return self.out / "state" / "state.pt"

    def save(self, state: dict) -> None:
        """Write the resumable state (main process only)."""
        if self.accelerator.is_main_process:
            atomic_save(state, self.state_path)

    def stopping(self) -> bool:
        return self.stop_after is not None and self.steps_taken >= self.stop_after


# -- one stage -----------------------------------------------------------------------------


class StageTrainer:
    """Train ``model`` for the remaining steps of stage ``name`` (improved-diffusion style:
    run_loop -> run_step -> forward_backward, plus save).

    ``state`` is the resumable state dict (mutated in place and saved at checkpoints);
    ``batch_loss(model, hr, lr) -> (loss, parts)``; ``extra_state()`` adds keys to each save;
    ``on_sample(step)`` writes validation samples every ``sample_every`` steps.
    """

    def __init__(
        self,
        run: Run,
        name: str,
        model: torch.nn.Module,
        dataset: Dataset,
        batch_loss: Callable,
        state: dict,
        extra_state: Callable[[], dict],
        on_sample: Callable[[int], None] | None,
    ):
        self.run, self.name, self.model, self.state = run, name, model, state
        self.batch_loss, self.extra_state, self.on_sample = batch_loss, extra_state, on_sample
        cfg, acc = run.cfg, run.accelerator
        self.stage: StageConfig = getattr(cfg, name)
        self.opt = Optimization.build(model, self.stage, run.log)
        self.step, self.position = 0, 0
        if state.get("stage") == name and "optimizer" in state:  # resuming mid-stage
            self.step, self.position = self.opt.load(model, state, run.gen)
        self.model_p, self.optimizer_p = acc.prepare(model, self.opt.optimizer)
        self.loader = run.batches(dataset, self.stage.batch_size, STAGES.index(name), self.position)
        self.bar = None

    def save(self) -> None:
        if not self.run.accelerator.is_main_process:
            return
        self.state.update(
            stage=self.name,
            step=self.step,
            position=self.position,
            **self.opt.state_dict(self.model, self.run.gen),
            **self.extra_state(),
        )
        atomic_save(self.state, self.run.state_path)

    def run_loop(self) -> bool:
        """Returns False if stopped early (state saved), True when the stage is done."""
        self._open_bar()
        self.model_p.train()
        self.t0, self.step0 = time.perf_counter(), self.step
        while self.step < self.stage.steps:
            if self.run.stopping():
                self.save()
                self._close_bar()
                return False
            self.run_step()
        self._close_bar()
        if self.opt.ema is not None:  # the stage's result is the averaged weights
            self.opt.ema.copy_to(self.model)
        self.state.pop("optimizer", None)
        return True

    def run_step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches, then log / sample / save."""
        self.optimizer_p.zero_grad(set_to_none=True)
        loss, parts = self.forward_backward()
        self.opt.step(self.model, self.stage.grad_clip)
        self.step += 1
        self.run.steps_taken += 1
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.name} loss is {loss} at step {self.step}")
        self._log(loss, parts)
        stage = self.stage
        if self.on_sample and stage.sample_every and self.step % stage.sample_every == 0:
            self.on_sample(self.step)
            self.model_p.train()
        if stage.ckpt_every and self.step % stage.ckpt_every == 0:
            self.save()

    def forward_backward(self) -> tuple[float, dict[str, float]]:
        """Accumulate gradients over the micro-batches; returns the mean loss and its parts."""
        acc, accum = self.run.accelerator, self.stage.grad_accum
        parts_sum: dict[str, float] = {}
        loss_sum = 0.0
        for micro in range(accum):
            hr, lr = next(self.loader)
            self.position += 1
            hr, lr = hr.to(self.run.device), lr.to(self.run.device)
            sync = micro + 1 == accum
            with contextlib.nullcontext() if sync else acc.no_sync(self.model_p):
                with autocast(self.run.device, self.stage.amp):
                    loss, parts = self.batch_loss(self.model_p, hr, lr)
                acc.backward(self.opt.scaler.scale(loss / accum))
            loss_sum += float(loss.detach()) / accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / accum
        return loss_sum, parts_sum

    def _log(self, loss: float, parts: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}")
        run, name, step = self.run, self.name, self.step
        every = self.stage.log_every
        if not (every and step % every == 0 and run.accelerator.is_main_process):
            return
        rate = (time.perf_counter() - self.t0) / max(1, step - self.step0)
        run.log(
            f"{name} step {step}/{self.stage.steps} loss {loss:.5g} "
            + " ".join(f"{k} {v:.4g}" for k, v in parts.items())
            + f" lr {self.opt.last_lr():.3g} ({rate:.4f} s/step)"
        )
        if run.writer is not None:
            run.writer.add_scalar(f"{name}/loss", loss, step)
            for k, v in parts.items():
                run.writer.add_scalar(f"{name}/{k}", v, step)
            run.writer.add_scalar(f"{name}/lr", self.opt.last_lr(), step)

    def _open_bar(self) -> None:
        if self.run.progress and self.run.accelerator.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.stage.steps,
                initial=self.step,
                desc=self.name,
                dynamic_ncols=True,
                mininterval=2.0,
            )

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_stage(run: Run, name: str, model: torch.nn.Module, dataset: Dataset, *args) -> bool:
    """``StageTrainer(...).run_loop()``; returns False if stopped early."""
    return StageTrainer(run, name, model, dataset, *args).run_loop()
