"""Stage 0: pretraining the unimodal parts that later stay frozen (tokenizer, causal LM, vision encoder).

Real users bring published weights for these; the ShapesWorld recipe trains small ones from scratch
because nothing can be downloaded here.
"""

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
