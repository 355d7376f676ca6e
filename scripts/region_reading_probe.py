"""Can the LM answer "What <attribute> is <region>?" from the `<region>` embedding? Minutes, not a training run.

An act model's region encoder is frozen; its embedding of each marked region feeds a fresh reader — a linear
map, or with `--question-aware` an MLP that also reads the mean input embedding of the prompt's words — whose
output fills `<region>`. Only the reader trains (with `--lora`, the LLM's LoRA too), on the region questions of
`--train` (eval JSON lines: `mmbridge eval region`'s format), and the answers of `--test` are scored
teacher-forced (every answer token the argmax). Also prints a logistic probe per attribute of the frozen
embedding itself: whether the region encoder *encodes* the attribute, as against whether the LM *reads* it.

    python scripts/region_reading_probe.py --model runs/e1/act/stage1/model \
        --train data/act-val/region_val.jsonl --test data/eval-all/act/region_test.jsonl   # ~5 min, 1 core

docs/recipe.md ("Runs e1 / e2") has the numbers of session 2026-12-04e. Not a library module.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from mmbridge.evaluate_act import request_content
from mmbridge.modeling.act.region import query_under_region
from mmbridge.modeling.model import MMBridgeModel
from mmbridge.processing import MMBridgeProcessor


def read(path: str, limit: int | None) -> list[dict]:
    root = Path(path).parent
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [{**r, "path": str(root / r["image"])} for r in records[:limit]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--test-limit", type=int, default=600)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora", action="store_true", help="the LLM's LoRA trains too (as in act stage 2)")
    parser.add_argument("--question-aware", action="store_true")
    parser.add_argument("--slot", action="store_true",
                        help="the region's embedding is the soft-prompt token of the Q-Former query whose object box "
                             "holds most of the region (the vector the LM already reads in see mode), not the "
                             "region encoder's")
    parser.add_argument("--mark-image", action="store_true",
                        help="also add a learned vector to the ViT features under the region, so the instruction-"
                             "aware Q-Former (whose soft prompts the LM reads) sees which object is meant")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MMBridgeModel.from_pretrained(args.model).eval()
    processor = MMBridgeProcessor.from_pretrained(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.llm.model.get_input_embeddings()
    added = set(model.config.added_tokens.values()) | {model.config.image_token_index}

    def batch_of(records: list[dict]) -> tuple[dict, torch.Tensor, torch.Tensor]:
        conversations = [[{"role": "user", "content": request_content(r["question"], r["region"])},
                          {"role": "assistant", "content": r["answer"]}] for r in records]
        batch = processor(conversations, images=[Image.open(r["path"]).convert("RGB") for r in records],
                          return_labels=True)
        with torch.no_grad():
            vision = model.vision(batch["pixel_values"])
            if args.slot:
                regions = slot_tokens(batch, vision)
            else:
                regions = model.region_features(batch["pixel_values"], batch["region_image_index"],
                                                batch["region_masks"], vision)
        return batch, vision, regions

    def slot_tokens(batch: dict, vision: torch.Tensor) -> torch.Tensor:
        queries = model.get_query_states(batch["pixel_values"], batch.get("qformer_input_ids"),
                                         batch.get("qformer_attention_mask"), vision)
        index = batch["region_image_index"]
        found = {k: v[index] for k, v in model.qformer.objects(queries).items()}
        picked = query_under_region(found["boxes"], found["objectness"], batch["region_masks"])
        return model.projection(queries)[index, picked]

    hidden = model.config.text_config.hidden_size
    if args.question_aware:
        reader = torch.nn.Sequential(torch.nn.Linear(2 * hidden, 2 * hidden), torch.nn.GELU(),
                                     torch.nn.Linear(2 * hidden, hidden))
    else:
        reader = torch.nn.Linear(hidden, hidden)
        if args.slot:  # start from the slot's own vector: what the LM reads without any training
            torch.nn.init.eye_(reader.weight)
        else:
            torch.nn.init.normal_(reader.weight, std=0.02)
        torch.nn.init.zeros_(reader.bias)
    params = list(reader.parameters())
    mark = torch.nn.Parameter(torch.zeros(model.config.vision_config.hidden_size))
    if args.mark_image:
        params.append(mark)
    if args.lora:
        lora = [p for n, p in model.llm.named_parameters() if ".lora_" in n]
        for p in lora:
            p.requires_grad_(True)
        params += lora
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    def logits(batch: dict, vision: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        if args.question_aware:  # the prompt's own words (labels -100: not the answer), no image / added tokens
            ids = batch["input_ids"]
            words = (batch["labels"] == -100) & (batch["attention_mask"] == 1)
            words &= ~torch.isin(ids, torch.tensor(sorted(added)))
            question = (embed(ids) * words[..., None]).sum(1) / words.sum(1, keepdim=True)
            regions = reader(torch.cat([regions, question[batch["region_image_index"]].detach()], -1))
        else:
            regions = reader(regions)
        if args.mark_image:  # each patch's share of the region, times the mark (a leading CLS token unmarked)
            side = int((vision.shape[1] - (0 if int(vision.shape[1] ** 0.5) ** 2 == vision.shape[1] else 1)) ** 0.5)
            share = F.adaptive_avg_pool2d(batch["region_masks"][:, None].float(), side).flatten(1)  # (R, side²)
            marks = torch.zeros(vision.shape[:2], dtype=vision.dtype)
            marks[batch["region_image_index"], vision.shape[1] - side * side:] = share
            vision = vision + marks[..., None] * mark
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"], vision_features=vision,
                                    region_features=regions, qformer_input_ids=batch.get("qformer_input_ids"),
                                    qformer_attention_mask=batch.get("qformer_attention_mask"))
        return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits

    train = read(args.train, None)
    cache = [batch_of(train[i:i + 16]) for i in range(0, len(train), 16)]
    for step in range(args.steps):
        batch, vision, regions = cache[step % len(cache)]
        out = logits(batch, vision, regions)
        loss = F.cross_entropy(out[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)

    test = read(args.test, args.test_limit)
    right, features = defaultdict(list), []
    with torch.no_grad():
        for i in range(0, len(test), 32):
            records = test[i:i + 32]
            batch, vision, regions = batch_of(records)
            features.append(regions)
            predicted, labels = logits(batch, vision, regions)[:, :-1].argmax(-1), batch["labels"][:, 1:]
            for k, r in enumerate(records):
                answer = labels[k] != -100
                right[r["type"]].append(bool((predicted[k][answer] == labels[k][answer]).all()))
    print("read (teacher-forced answers right):", {t: round(sum(v) / len(v), 3) for t, v in right.items()})

    x = torch.cat(features)  # does the frozen embedding encode each attribute? (train 60 % / test 40 %)
    for attribute in sorted({r["type"] for r in test}):
        index = [k for k, r in enumerate(test) if r["type"] == attribute]
        names = sorted({test[k]["answer"] for k in index})
        y = torch.tensor([names.index(test[k]["answer"]) for k in index])
        z = x[index]
        z = (z - z.mean(0)) / (z.std(0) + 1e-6)
        cut = int(len(index) * 0.6)
        probe = torch.nn.Linear(z.shape[1], len(names))
        probe_optimizer = torch.optim.Adam(probe.parameters(), lr=0.01)
        for _ in range(300):
            probe_optimizer.zero_grad()
            F.cross_entropy(probe(z[:cut]), y[:cut]).backward()
            probe_optimizer.step()
        accuracy = (probe(z[cut:]).argmax(-1) == y[cut:]).float().mean().item()
        print(f"encoded ({attribute}, linear probe on held-out regions): {accuracy:.3f}")


if __name__ == "__main__":
    main()
