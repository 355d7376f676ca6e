"""Vision-encoder pretraining: CLIP contrastive loss plus an optional dense auxiliary target.

The contrastive part is transformers' `CLIPModel` (its `return_loss=True` is the symmetric InfoNCE
of CLIP). On its own it teaches little about counts and positions at small scale (in-batch negatives
rarely differ only there), so callers can add a dense target: each patch token predicts labels of
what covers it (for ShapesWorld: color, shape, size). The heads are thrown away afterwards; only the
vision tower is kept and frozen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModel, PreTrainedTokenizerFast
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

from mmbridge.pretrain import adamw_with_warmup_cosine


@dataclass
class VisionConfig:
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    text_hidden_size: int = 128
    text_layers: int = 2
    projection_dim: int = 128
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.05
    dense_weight: float = 1.0
    #: name -> number of classes of each dense per-patch target (empty: CLIP loss only)
    dense_targets: dict = field(default_factory=dict)
    seed: int = 0


class CLIPWithDenseHeads(nn.Module):
    def __init__(self, tokenizer: PreTrainedTokenizerFast, cfg: VisionConfig):
        super().__init__()
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size,
                             intermediate_size=4 * cfg.text_hidden_size, num_hidden_layers=cfg.text_layers,
                             num_attention_heads=cfg.num_heads, max_position_embeddings=128,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                               intermediate_size=4 * cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                               num_attention_heads=cfg.num_heads),
            projection_dim=cfg.projection_dim,
        )
        torch.manual_seed(cfg.seed)
        self.clip = CLIPModel(config)
        self.dense_heads = nn.ModuleDict({name: nn.Linear(cfg.hidden_size, n) for name, n in cfg.dense_targets.items()})

    def embed(self, pixel_values, input_ids, attention_mask):
        """(normalised image embeds, normalised text embeds, patch hidden states).

        The text is pooled at its last real token, which callers make the EOS. transformers' CLIP pools
        at `input_ids.argmax()` whenever `eos_token_id == 2` (OpenAI's vocabulary put EOS last); with
        our tokenizers (EOS = 2) that picks the first word, so pooling is done here instead."""
        vision = self.clip.vision_model(pixel_values=pixel_values)
        text = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask)
        last = attention_mask.sum(dim=1) - 1
        pooled_text = text.last_hidden_state[torch.arange(input_ids.shape[0]), last]
        image_embeds = nn.functional.normalize(self.clip.visual_projection(vision.pooler_output), dim=-1)
        text_embeds = nn.functional.normalize(self.clip.text_projection(pooled_text), dim=-1)
        return image_embeds, text_embeds, vision.last_hidden_state

    def forward(self, pixel_values, input_ids, attention_mask, dense_labels: dict | None = None,
                dense_weight: float = 1.0) -> dict:
        image_embeds, text_embeds, hidden = self.embed(pixel_values, input_ids, attention_mask)
        logits_per_text = text_embeds @ image_embeds.t() * self.clip.logit_scale.exp()
        losses = {"itc": image_text_contrastive_loss(logits_per_text)}
        if dense_labels:
            patches = hidden[:, 1:]
            for name, labels in dense_labels.items():
                logits = self.dense_heads[name](patches)
                losses[name] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        losses["loss"] = losses["itc"] + dense_weight * sum(v for k, v in losses.items() if k != "itc")
        return losses

    def vision_tower(self) -> CLIPVisionModel:
        """The vision encoder alone, as an HF model (what mmbridge freezes and composes)."""
        tower = CLIPVisionModel(self.clip.vision_model.config)
        tower.load_state_dict(self.clip.vision_model.state_dict())
        return tower.eval()

    def text_tower(self) -> CLIPTextModel:
        """The text encoder alone (what conditions the draw generator's UNet, as CLIP's does SD's)."""
        tower = CLIPTextModel(self.clip.text_model.config)
        tower.load_state_dict(self.clip.text_model.state_dict())
        return tower.eval()


def pretrain_vision(model: CLIPWithDenseHeads, sample_batch: Callable[[int, int], dict], cfg: VisionConfig,
                    log: Callable[[dict], None] = print, log_every: int = 50) -> list[float]:
    """`sample_batch(step, batch_size)` returns pixel_values, input_ids, attention_mask, dense_labels."""
    optimizer, schedule = adamw_with_warmup_cosine(model, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                                   steps=cfg.steps, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    model.train()
    history, start, window = [], time.perf_counter(), []
    for step in range(cfg.steps):
        batch = sample_batch(step, cfg.batch_size)
        losses = model(**batch, dense_weight=cfg.dense_weight)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append(losses["loss"].item())
        window.append({k: v.item() for k, v in losses.items()})
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            mean = {k: round(sum(w[k] for w in window) / len(window), 4) for k in window[0]}
            log({"step": step + 1, **mean, "lr": schedule.get_last_lr()[0],
                 "elapsed_s": round(time.perf_counter() - start, 1)})
            window = []
    model.eval()
    return history


@torch.no_grad()
def retrieval_recall_at_1(model: CLIPWithDenseHeads, pixel_values, input_ids, attention_mask) -> dict:
    """Image->text and text->image R@1 over one set of aligned pairs (pair i matches i)."""
    image_embeds, text_embeds, _ = model.embed(pixel_values, input_ids, attention_mask)
    sim = image_embeds @ text_embeds.t()
    target = torch.arange(pixel_values.shape[0])
    i2t = (sim.argmax(1) == target).float().mean().item()
    t2i = (sim.argmax(0) == target).float().mean().item()
    return {"image_to_text_r1": i2t, "text_to_image_r1": t2i}


def patch_labels(masks: Sequence, labels: Sequence[int], image_size: int, patch_size: int,
                 background: int = 0, min_cover: float = 0.15) -> torch.Tensor:
    """Per-patch class: the label of the object covering most of the patch (>= `min_cover`), else
    `background`. `masks` are HxW boolean arrays, one per object."""
    grid = image_size // patch_size
    out = torch.full((grid * grid,), background, dtype=torch.long)
    best = torch.zeros(grid * grid)
    for mask, label in zip(masks, labels):
        cover = torch.as_tensor(mask, dtype=torch.float32).reshape(grid, patch_size, grid, patch_size).mean((1, 3))
        cover = cover.flatten()
        take = (cover >= min_cover) & (cover > best)
        out[take] = label
        best = torch.where(take, cover, best)
    return out
