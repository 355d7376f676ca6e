"""Causal-LM pretraining on a text corpus (a transformers Llama; the tokenizer: `mmbridge.tokenization`)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mmbridge.pretrain import LoopCheckpoint, adamw_with_warmup_cosine, optimizer_step

# Tokenizer training lives in `mmbridge.tokenization` (the test kit and the processor use it too);
# stage 0 trains the shipped tokenizers with it, so it is re-exported here.
from mmbridge.tokenization import (  # noqa: F401
    SPECIAL_TOKENS,
    byte_level_pre_tokenizer,
    train_tokenizer,
    word_token_decoder,
    word_token_normalizer,
)


@dataclass
class LMConfig:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768
    max_length: int = 384
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.05
    #: Untied by default: with tied input/output embeddings small LMs here learned to copy a word
    #: from the context (what answering from a description needs) far more slowly, or not at all.
    tie_word_embeddings: bool = False
    eval_every: int = 0  # steps between calls of pretrain_causal_lm's `evaluate` (0: never)
    save_every: int = 250  # steps between resumable checkpoints (with a `checkpoint_dir`)
    seed: int = 0


def build_causal_lm(tokenizer: PreTrainedTokenizerFast, cfg: LMConfig) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_length + 256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


Segments = Sequence[tuple[str, bool]]


@dataclass
class Branches:
    """A shared prefix and continuations that each see the prefix but not one another: one row, a
    block attention mask, and positions that restart after the prefix, so every branch is trained
    exactly as if it followed the prefix alone (several first turns about one context for the price
    of one context). Each branch ends with EOS."""

    prefix: Segments
    branches: Sequence[Segments]

    def text(self) -> str:
        return "".join(t for t, _ in self.prefix) + "".join(t for b in self.branches for t, _ in b)


Sample = str | Segments | Branches


def encode_segments(tokenizer: PreTrainedTokenizerFast, sample: str | Segments) -> tuple[list[int], list[int]]:
    """A sample's token ids and labels, each segment tokenized on its own (how training sees it)."""
    segments = [(sample, True)] if isinstance(sample, str) else list(sample)
    ids, labels = [], []
    for text, trained in segments:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [-100] * len(piece)
    return ids, labels


def encode_row(tokenizer: PreTrainedTokenizerFast, sample: Sample) -> tuple[list[int], list[int], list[int], list[int]]:
    """ids, labels, positions and branch numbers (0: seen by every later token) of one sample."""
    eos = [(tokenizer.eos_token, True)]
    if not isinstance(sample, Branches):
        segments = [(sample, True)] if isinstance(sample, str) else list(sample)
        ids, labels = encode_segments(tokenizer, [*segments, *eos])
        return ids, labels, list(range(len(ids))), [0] * len(ids)
    ids, labels = encode_segments(tokenizer, sample.prefix)
    positions, groups = list(range(len(ids))), [0] * len(ids)
    start = len(ids)
    for k, branch in enumerate(sample.branches, 1):
        b_ids, b_labels = encode_segments(tokenizer, [*branch, *eos])
        ids, labels = ids + b_ids, labels + b_labels
        positions += range(start, start + len(b_ids))
        groups += [k] * len(b_ids)
    return ids, labels, positions, groups


def branch_attention_mask(groups: torch.Tensor, lengths: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(batch, 1, L, L) additive mask: causal, within the row's length, and a token of branch k sees
    the prefix (0) and branch k only. Padding rows see themselves (no all-masked softmax rows)."""
    width = groups.shape[1]
    index = torch.arange(width)
    causal = index[None, :, None] >= index[None, None, :]
    same = (groups[:, None, :] == 0) | (groups[:, None, :] == groups[:, :, None])
    valid = index[None, None, :] < lengths[:, None, None]
    allowed = (causal & same & valid) | torch.eye(width, dtype=torch.bool)[None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def encode_samples(tokenizer: PreTrainedTokenizerFast, samples: Sequence[Sample], max_length: int) -> dict:
    """Samples -> right-padded `input_ids`, `attention_mask`, `labels` (+ `position_ids` and a 4-D
    mask when a sample is `Branches`).

    A sample is a string (every token trained), a list of `(text, trained)` segments, e.g. a
    context that is only read and answers that are learned, or `Branches`. EOS ends every sample.
    """
    rows = [[part[:max_length] for part in encode_row(tokenizer, s)] for s in samples]
    width = max(len(r[0]) for r in rows)

    def pad(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values])

    batch = {
        "input_ids": pad([r[0] for r in rows], tokenizer.pad_token_id),
        "attention_mask": pad([[1] * len(r[0]) for r in rows], 0),
        "labels": pad([r[1] for r in rows], -100),
    }
    if any(isinstance(s, Branches) for s in samples):
        batch["attention_mask"] = branch_attention_mask(pad([r[3] for r in rows], 0), batch["attention_mask"].sum(1))
        batch["position_ids"] = pad([r[2] for r in rows], 0)
    return batch


def pretrain_causal_lm(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                       sample_texts: Callable[[random.Random, int], Sequence[Sample]], cfg: LMConfig,
                       log: Callable[[dict], None] = print, log_every: int = 50,
                       evaluate: Callable[[LlamaForCausalLM], dict] | None = None,
                       checkpoint_dir: str | Path | None = None) -> list[float]:
    """Next-token training on samples drawn by `sample_texts(rng, batch_size)` (an endless corpus).

    Padding is never trained; within a sample, segments marked untrained (see `encode_samples`)
    are context only. `evaluate(model)` runs every `cfg.eval_every` steps and its result is logged.
    With `checkpoint_dir`, the loop saves itself every `cfg.save_every` steps and a rerun resumes
    from the last save, exactly (each step draws its samples from an RNG seeded by the step), so a
    foundation LM that trains for hours survives a kill. Returns the losses of the steps it ran.
    """
    optimizer, schedule = adamw_with_warmup_cosine(model, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                                                   steps=cfg.steps, weight_decay=cfg.weight_decay)
    checkpoint = LoopCheckpoint(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    first = checkpoint.restore(model, optimizer, schedule) if checkpoint is not None else 0
    if first:
        log({"resumed_at_step": first})
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(first, cfg.steps):
        rng = random.Random(cfg.seed * 1_000_003 + step)
        batch = encode_samples(tokenizer, sample_texts(rng, cfg.batch_size), cfg.max_length)
        labels = batch.pop("labels")
        if batch["attention_mask"].ndim == 4:  # an additive mask (`Branches`): SDPA wants the model's dtype
            batch["attention_mask"] = batch["attention_mask"].to(model.dtype)
        loss = model(**batch, labels=labels).loss
        optimizer_step(model, optimizer, schedule, loss, f"step {step}")
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            window = losses[-log_every:]
            log({"step": step + 1, "loss": sum(window) / len(window), "lr": schedule.get_last_lr()[0],
                 "elapsed_s": round(time.perf_counter() - start, 1)})
        if checkpoint is not None and cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            checkpoint.save(model, optimizer, schedule, step + 1)
        if evaluate is not None and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            model.eval()
            log({"step": step + 1, "eval": evaluate(model)})
            model.train()
    model.eval()
    return losses


@torch.no_grad()
def greedy_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str | Segments],
                   stop: str, max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
    """Greedy completions of `prompts` (strings, or segments tokenized one by one as in training),
    cut at `stop` (left padding for the batch)."""
    answers = []
    for i in range(0, len(prompts), batch_size):
        rows = [encode_segments(tokenizer, p)[0] for p in prompts[i:i + batch_size]]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, stop_strings=[stop],
                             tokenizer=tokenizer)
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).split(stop)[0].strip())
    return answers
