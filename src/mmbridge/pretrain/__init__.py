"""Stage 0: pretraining the unimodal parts that later stay frozen (tokenizer, causal LM, vision encoder).

Real users bring published weights for these; the ShapesWorld recipe trains small ones from scratch
because nothing can be downloaded here.
"""

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mmbridge.train.config import ScheduleConfig
from mmbridge.train.schedule import build_scheduler


def adamw_with_warmup_cosine(model: torch.nn.Module, *, lr: float, min_lr: float, warmup_steps: int, steps: int,
                             weight_decay: float, betas=(0.9, 0.98)):
    """AdamW (no decay on biases and norms) + the same warmup-cosine schedule the trainer uses."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    schedule = build_scheduler(optimizer, ScheduleConfig(total_steps=steps, init_lr=lr, min_lr=min_lr,
                                                         warmup_lr=lr / 100, warmup_steps=warmup_steps))
    return optimizer, schedule


class LoopCheckpoint:
    """`dir/weights.safetensors` + `dir/state.pt` (optimizer, schedule, step, RNG); written atomically, so
    a stage-0 loop killed at any moment resumes from its last save. (The trainer has its own,
    accelerate-based checkpoints; these loops train plain modules for hours in the foundation recipe.)"""

    def __init__(self, directory: Path):
        self.directory = directory

    def restore(self, model, optimizer, schedule) -> int:
        from safetensors.torch import load_file

        state_file = self.directory / "state.pt"
        if not state_file.is_file():
            return 0
        model.load_state_dict(load_file(str(self.directory / "weights.safetensors")))
        state = torch.load(state_file, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        return int(state["step"])

    def save(self, model, optimizer, schedule, step: int) -> None:
        from safetensors.torch import save_file

        tmp = self.directory.with_name(self.directory.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "weights.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                    "rng": torch.get_rng_state()}, tmp / "state.pt")
        if self.directory.exists():
            for f in self.directory.iterdir():
                f.unlink()
            self.directory.rmdir()
        tmp.rename(self.directory)


def optimizer_step(model, optimizer, schedule, loss: torch.Tensor, where: str) -> None:
    """One update of a stage-0 loop: a non-finite loss stops it (naming `where`), gradients clipped at 1.0."""
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()} at {where}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()


def resumable_loop(model, steps: int, lr: float, warmup: int, checkpoint: LoopCheckpoint, save_every: int,
          step_loss: Callable[[int], dict[str, torch.Tensor]], log: Callable[[dict], None]) -> list[float]:
    """Train `model` for `steps` of `step_loss(step)` (a pure function of the step, so a resumed run sees the
    same batches): AdamW, warmup-cosine to lr / 10, gradients clipped at 1.0, a save every `save_every` steps."""
    optimizer, schedule = adamw_with_warmup_cosine(model, lr=lr, min_lr=lr / 10, warmup_steps=warmup, steps=steps,
                                                   weight_decay=0.0)
    start_step = checkpoint.restore(model, optimizer, schedule)
    model.train()
    history, start = [], time.perf_counter()
    for step in range(start_step, steps):
        parts = step_loss(step)
        loss = sum(parts.values())
        optimizer_step(model, optimizer, schedule, loss, f"step {step + 1}: {parts}")
        history.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log({"step": step + 1, **{k: round(v.item(), 5) for k, v in parts.items()},
                 "elapsed_s": round(time.perf_counter() - start, 1)})
        if (step + 1) % save_every == 0 or step + 1 == steps:
            checkpoint.save(model, optimizer, schedule, step + 1)
    model.eval()
    return history
