"""BLIP-2 stage 1: Q-Former representation learning on a frozen image encoder (ITC + ITM + ITG).

Follows LAVIS' `Blip2Qformer.forward`: ITC takes the best-matching query per image-text pair with
in-batch negatives and a learned temperature; ITM scores one positive and two hard negatives per
sample (a negative image per text and a negative text per image, drawn from the ITC similarity
softmax) and averages its logits over the queries; ITG generates the text from the queries under the
multimodal-causal mask. The attention masks live in `mmbridge.modeling.qformer`.

One deviation, for a world with few distinct captions: in-batch pairs whose texts are identical are
both positives (soft ITC targets, never drawn as ITM negatives) instead of being pushed apart.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from mmbridge.modeling.qformer import QFormer, tokenize_qformer_text
from mmbridge.pretrain import adamw_with_warmup_cosine


@dataclass
class QFormerStageConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-4  # BLIP-2's init_lr; ShapesWorld recipes raise it (tiny model, short run)
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    label_smoothing: float = 0.1  # BLIP-2 uses 0.1 for ITG
    losses: list[str] = field(default_factory=lambda: ["itc", "itm", "itg"])
    seed: int = 0


def tokenize_for_qformer(tokenizer, texts: Sequence[str], cls_token_id: int, max_length: int = 64):
    return tokenize_qformer_text(tokenizer, texts, cls_token_id, max_length)


def qformer_losses(qformer: QFormer, image_features: torch.Tensor, texts: Sequence[str], tokenizer, *,
                   cls_token_id: int, dec_token_id: int, generation_texts: Sequence[str] | None = None,
                   losses: Sequence[str] = ("itc", "itm", "itg"), label_smoothing: float = 0.1,
                   generator: torch.Generator | None = None, max_length: int = 64) -> dict[str, torch.Tensor]:
    """The stage-1 losses for a batch of (image features, text) pairs; `generation_texts` (default:
    `texts`) are what ITG learns to write — e.g. a detailed description where ITC/ITM use a caption."""
    out: dict[str, torch.Tensor] = {}
    batch = image_features.shape[0]
    same_text = torch.tensor([[a == b for b in texts] for a in texts], device=image_features.device)
    ids, mask = tokenize_for_qformer(tokenizer, texts, cls_token_id, max_length)

    if "itc" in losses or "itm" in losses:
        image_embeds = qformer.image_embeds(image_features)
        text_embeds = qformer.text_embeds(ids, mask)
        scale = qformer.text.logit_scale.exp().clamp(max=100.0)
        sim_i2t = qformer.similarity(image_embeds, text_embeds) * scale  # (images, texts)
        sim_t2i = sim_i2t.t()
        if "itc" in losses:
            targets = same_text.float() / same_text.float().sum(dim=1, keepdim=True)
            out["itc"] = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2

    if "itm" in losses:
        with torch.no_grad():  # hard negatives: likely-but-wrong partners (never a same-text pair)
            weights_t2i = F.softmax(sim_t2i.float(), dim=1).masked_fill(same_text, 0) + 1e-9
            weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(same_text, 0) + 1e-9
            has_negative = ~same_text.all(dim=1)
            neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
            neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
        keep = has_negative.nonzero().squeeze(1)
        itm_images = torch.cat([image_features, image_features[neg_image[keep]], image_features[keep]])
        itm_ids = torch.cat([ids, ids[keep], ids[neg_text[keep]]])
        itm_mask = torch.cat([mask, mask[keep], mask[neg_text[keep]]])
        labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * len(keep), dtype=torch.long)])
        logits = qformer.itm_logits(itm_images, itm_ids, itm_mask)
        out["itm"] = F.cross_entropy(logits, labels.to(logits.device))

    if "itg" in losses:
        gen_ids, gen_mask = tokenize_qformer_text(tokenizer, generation_texts or texts, dec_token_id, max_length)
        logits = qformer.itg_logits(image_features, gen_ids, gen_mask)
        targets = gen_ids[:, 1:].masked_fill(gen_mask[:, 1:] == 0, -100)
        out["itg"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     ignore_index=-100, label_smoothing=label_smoothing)
    return out


def pretrain_qformer(qformer: QFormer, batches: Iterator[dict], tokenizer, cfg: QFormerStageConfig, *,
                     cls_token_id: int, dec_token_id: int, log: Callable[[dict], None] = print,
                     log_every: int = 50) -> list[dict]:
    """Train the Q-Former (queries, transformer and text side) on batches of
    `{"image_features", "texts", "generation_texts"}`; the image encoder is not involved (its features
    are computed once, outside). Returns the per-step loss dicts."""
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer, schedule = adamw_with_warmup_cosine(qformer, lr=cfg.lr, min_lr=cfg.min_lr,
                                                   warmup_steps=cfg.warmup_steps, steps=cfg.steps,
                                                   weight_decay=cfg.weight_decay)
    qformer.train()
    history, start = [], time.perf_counter()
    for step in range(cfg.steps):
        batch = next(batches)
        parts = qformer_losses(qformer, batch["image_features"], batch["texts"], tokenizer,
                               cls_token_id=cls_token_id, dec_token_id=dec_token_id,
                               generation_texts=batch.get("generation_texts"), losses=cfg.losses,
                               label_smoothing=cfg.label_smoothing, generator=generator)
        loss = sum(parts.values())
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"stage-1 loss is {loss.item()} at step {step}: {parts}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(qformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        history.append({k: v.item() for k, v in parts.items()})
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            window = history[-log_every:]
            log({"step": step + 1, **{k: round(sum(h[k] for h in window) / len(window), 4) for k in parts},
                 "lr": schedule.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - start, 1)})
    qformer.eval()
    return history


@torch.no_grad()
def retrieval_recall(qformer: QFormer, image_features: torch.Tensor, texts: Sequence[str], tokenizer, *,
                     cls_token_id: int, batch_size: int = 256) -> dict[str, float]:
    """ITC image->text and text->image R@1 over aligned (image i, text i) pairs.

    A retrieved item counts as correct when its text equals the true text: scenes that share a caption
    are indistinguishable by that caption, so either is a right answer."""
    qformer.eval()
    image_embeds = torch.cat([qformer.image_embeds(image_features[i:i + batch_size])
                              for i in range(0, len(image_features), batch_size)])
    text_embeds = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenize_for_qformer(tokenizer, texts[i:i + batch_size], cls_token_id)
        text_embeds.append(qformer.text_embeds(ids, mask))
    i2t, t2i, _ = recall_at_1(qformer.similarity(image_embeds, torch.cat(text_embeds)), texts)
    return {"image_to_text_r1": i2t.float().mean().item(), "text_to_image_r1": t2i.float().mean().item(),
            "n": len(texts)}


def recall_at_1(sim: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item R@1 hits from an (images, texts) similarity of aligned pairs: (image->text hits,
    text->image hits, best text per image). Identical texts are equally right answers."""
    same_text = torch.tensor([[a == b for b in texts] for a in texts])
    rows = torch.arange(len(texts))
    best_text = sim.argmax(dim=1)
    return same_text[rows, best_text], same_text[sim.argmax(dim=0), rows], best_text
