"""Linear-warmup cosine learning rate, as MiniGPT-4 / BLIP-2 (LAVIS `linear_warmup_cosine_lr`).

Warm up linearly from `warmup_lr` to `init_lr` over `warmup_steps`, then follow a cosine from
`init_lr` down to `min_lr` at `total_steps`. LAVIS evaluates the cosine once per epoch
(`iters_per_epoch` reproduces that exactly); without it the cosine is smooth per step.

The schedule is a pure function of the step, wrapped in a `LambdaLR` whose factor multiplies each
parameter group's own base lr — so per-component lr multipliers scale the whole curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmbridge.train.config import ScheduleConfig


def lr_at(step: int, cfg: ScheduleConfig) -> float:
    """The learning rate used for optimizer step `step` (0-based)."""
    if cfg.iters_per_epoch:
        epoch, max_epoch = step // cfg.iters_per_epoch, max(1, cfg.total_steps // cfg.iters_per_epoch)
        if epoch == 0:  # LAVIS: warmup (then flat) in the first epoch, cosine by epoch afterwards
            if step < cfg.warmup_steps:
                return cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * step / max(cfg.warmup_steps, 1)
            return cfg.init_lr
        return cfg.min_lr + (cfg.init_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * epoch / max_epoch))
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * step / cfg.warmup_steps
    span = max(cfg.total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr + (cfg.init_lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class WarmupCosineFactor:
    """Picklable `LambdaLR` factor (its fields land in the scheduler's state_dict, so a resumed run
    reports the schedule it was started with)."""

    warmup_lr: float
    init_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    iters_per_epoch: int | None = None

    def __call__(self, step: int) -> float:
        return lr_at(step, ScheduleConfig(**self.__dict__)) / self.init_lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    factor = WarmupCosineFactor(cfg.warmup_lr, cfg.init_lr, cfg.min_lr, cfg.warmup_steps, cfg.total_steps,
                                cfg.iters_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
