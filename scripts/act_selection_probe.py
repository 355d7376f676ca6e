"""Diagnose the act head's selection ("which objects did the request ask for") on frozen features, in minutes.

Two measurements, both on a see-model's frozen ViT (default: the shipped one; pass a see-model directory):

1. `attributes`: a linear probe of the patch features — for every patch whose centre lies in exactly one
   object, that object's colour, shape and size (val accuracy, and for objects of at most 10 px).
2. `selection`: small per-patch scorers trained with BCE on dense "inside an asked-for box" targets of det /
   grd requests (`data.shapes.act.make_request`), each reading the request a different way — the
   foundation's CLIP text tower's word states, or learned token embeddings — attending from each patch to
   the words (the act decoder's selection branch in miniature). Reported: how often the top-scoring patch lies
   inside an asked-for object, per request kind.

    python scripts/act_selection_probe.py --requests 2000 --steps 1500     # ~8 min on 2 cores

docs/recipe.md ("Act", "Why selection stays hard") has the numbers of session 2026-12-03f. Not a library
module: a measurement to run before changing the decoder.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from mmbridge.data.shapes.act import make_request
from mmbridge.data.shapes.world import COLORS, SHAPES, coverage_map, make_scene, render
from mmbridge.modeling import MMBridgeModel
from mmbridge.models import resolve_model_path
from mmbridge.pretrain.recipe import SHIPPED_FOUNDATION
from mmbridge.processing import MMBridgeProcessor

ATTRIBUTE_WORDS = {*COLORS, *SHAPES, *(s + "s" for s in SHAPES), "crosses", "small", "large"}
RELATION_WORDS = (" left of", " right of", " above", " below")


def patch_features(model, processor, scene) -> torch.Tensor:
    pixel_values = processor.image_processor(render(scene), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.vision(pixel_values)[0]
    side = int(features.shape[0] ** 0.5)
    return features[-side * side:]  # drop a CLS token


def attribute_probe(model, processor, train: int, val: int, steps: int = 400) -> dict:
    def collect(split, n):
        xs, ys, sizes = [], [], []
        for i in range(n):
            scene = make_scene(split, i)
            features = patch_features(model, processor, scene)
            side = int(features.shape[0] ** 0.5)
            cell = 64 // side
            masks = [torch.as_tensor(coverage_map(o)) > 0.5 for o in scene.objects]
            for p in range(side * side):
                y, x = (p // side) * cell + cell // 2, (p % side) * cell + cell // 2
                inside = [k for k, m in enumerate(masks) if m[y, x]]
                if len(inside) == 1:
                    o = scene.objects[inside[0]]
                    xs.append(features[p])
                    ys.append((list(COLORS).index(o.color), list(SHAPES).index(o.shape), int(o.size == "large")))
                    sizes.append(max(o.box[2] - o.box[0], o.box[3] - o.box[1]))
        return torch.stack(xs), torch.tensor(ys), torch.tensor(sizes)

    x_train, y_train, _ = collect("train", train)
    x_val, y_val, size_val = collect("val", val)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    out = {}
    for a, name, classes in ((0, "colour", len(COLORS)), (1, "shape", len(SHAPES)), (2, "size", 2)):
        probe = nn.Linear(x_train.shape[1], classes)
        optimizer = torch.optim.Adam(probe.parameters(), 1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(probe((x_train - mean) / std), y_train[:, a])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        right = (probe((x_val - mean) / std).argmax(1) == y_val[:, a]).float()
        small = size_val <= 10
        out[name] = {"val": round(right.mean().item(), 4), "objects_le_10px": round(right[small].mean().item(), 4)}
    return out


def request_kind(task: str, request: dict) -> str:
    if task == "grd":
        return "grd-relational" if any(w in request["request"].lower() for w in RELATION_WORDS) else "grd-plain"
    named = sum(w in ATTRIBUTE_WORDS for w in request.get("category", "").split())
    return f"det-{named}-attributes"


class WordAttentionScorer(nn.Module):
    """Each patch attends to the request's words; score = dot(patch, what it read) + objectness."""

    def __init__(self, vision_size: int, words: nn.Module, word_size: int, hidden: int = 128):
        super().__init__()
        self.patch = nn.Linear(vision_size, hidden)
        self.words, self.word_proj = words, nn.Linear(word_size, hidden)
        self.attention = nn.MultiheadAttention(hidden, 4, batch_first=True)
        self.match, self.objectness = nn.Linear(hidden, hidden), nn.Linear(hidden, 1)

    def forward(self, patches, words, mask):
        p = self.patch(patches)
        w = self.word_proj(self.words(words))
        read, _ = self.attention(p, w, w, key_padding_mask=~mask)
        return (self.match(p) * read).sum(-1) / p.shape[-1] ** 0.5 + self.objectness(p).squeeze(-1)


class ConjunctionScorer(nn.Module):
    """Each word of the request is a test a patch passes or fails — sigmoid(patch . word + bias) — and a
    learned gate per word says whether the word constrains what is asked ("red", "circles": yes; "find",
    "the": no). The score is objectness + the gated sum of log-probabilities: a logical AND over the named
    attributes, where a dot product with the request read as one vector is an OR ("red circles" scoring a
    red square and a blue circle half each)."""

    def __init__(self, vision_size: int, words: nn.Module, word_size: int, hidden: int = 128):
        super().__init__()
        self.patch = nn.Linear(vision_size, hidden)
        self.words, self.word_proj = words, nn.Linear(word_size, hidden)
        self.word_bias, self.gate = nn.Linear(word_size, 1), nn.Linear(word_size, 1)
        self.objectness = nn.Linear(hidden, 1)

    def forward(self, patches, words, mask):
        p, states = self.patch(patches), self.words(words)
        tests = torch.einsum("npd,nwd->npw", p, self.word_proj(states)) / p.shape[-1] ** 0.5
        tests = tests + self.word_bias(states).transpose(1, 2)
        gate = self.gate(states).squeeze(-1).sigmoid() * mask  # (n, words)
        return self.objectness(p).squeeze(-1) + (F.logsigmoid(tests) * gate[:, None]).sum(-1)


class FactoredScorer(nn.Module):
    """Attribute-factored selection: each patch classifies its object's attributes (colour, shape, size; trained
    densely on the patches inside exactly one object), one learned query per attribute reads the request's
    words and says which values it allows (or "any"), and the score is objectness + the sum over attributes of
    log P(the patch's value is allowed): an AND over attributes, each an OR over the values a request allows."""

    GROUPS = (len(COLORS), len(SHAPES), 2)

    def __init__(self, vision_size: int, words: nn.Module, word_size: int, hidden: int = 128):
        super().__init__()
        self.patch = nn.Sequential(nn.Linear(vision_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.attributes = nn.Linear(hidden, sum(self.GROUPS))
        self.words, self.word_proj = words, nn.Linear(word_size, hidden)
        self.group_queries = nn.Parameter(torch.randn(1, len(self.GROUPS), hidden) * 0.02)
        self.attention = nn.MultiheadAttention(hidden, 4, batch_first=True)
        self.allowed = nn.ModuleList(nn.Linear(hidden, k + 1) for k in self.GROUPS)
        self.objectness = nn.Linear(hidden, 1)
        self.attribute_logits = None

    def forward(self, patches, words, mask):
        p = self.patch(patches)
        w = self.word_proj(self.words(words))
        read, _ = self.attention(self.group_queries.expand(len(p), -1, -1), w, w, key_padding_mask=~mask)
        self.attribute_logits = self.attributes(p)
        score = self.objectness(p).squeeze(-1)
        for g, logits in enumerate(self.attribute_logits.split(self.GROUPS, dim=-1)):
            allowed = self.allowed[g](read[:, g]).softmax(-1)  # (n, values + any)
            fits = allowed[:, None, -1] + (logits.softmax(-1) * allowed[:, None, :-1]).sum(-1)
            score = score + fits.clamp(min=1e-6).log()
        return score


class FactoredPlusAttentionScorer(FactoredScorer):
    """The factored score plus the attention scorer's (relations: "left of the blue square" is no attribute)."""

    def __init__(self, vision_size: int, words: nn.Module, word_size: int, hidden: int = 128):
        super().__init__(vision_size, words, word_size, hidden)
        self.attention_scorer = WordAttentionScorer(vision_size, nn.Identity(), word_size, hidden)

    def forward(self, patches, words, mask):
        return super().forward(patches, words, mask) + self.attention_scorer(patches, self.words(words), mask)


SCORERS = {"attention": WordAttentionScorer, "conjunction": ConjunctionScorer, "factored": FactoredScorer,
           "factored+attention": FactoredPlusAttentionScorer}


def selection_probe(model, processor, tower, requests: int, val: int, steps: int, scorers=tuple(SCORERS),
                    seed: int = 0, words=("tower", "learned"), attribute_loss: bool = True) -> dict:
    rng = random.Random(seed)
    rows = []
    for split, n in (("train", requests), ("val", val)):
        for i in range(n):
            scene = make_scene(split, i)
            task = rng.choice(["det", "det", "grd"])
            request = make_request(scene, task, rng)
            if request is None:
                continue
            features = patch_features(model, processor, scene)
            side = int(features.shape[0] ** 0.5)
            ids = processor.tokenizer(request["request"], add_special_tokens=False)["input_ids"][:32]
            ids = [t if t < tower.config.vocab_size else tower.config.pad_token_id for t in ids]
            with torch.no_grad():
                states = tower(input_ids=torch.tensor([ids])).last_hidden_state[0]
            centres = (torch.arange(side) + 0.5) / side
            cy, cx = torch.meshgrid(centres, centres, indexing="ij")
            target = torch.zeros(side * side)
            for x0, y0, x1, y1 in request["target"]["boxes"]:
                inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
                target = torch.maximum(target, inside.float().flatten())
            labels = torch.full((side * side, 3), -1)
            masks = [torch.as_tensor(coverage_map(o)) > 0.5 for o in scene.objects]
            cell = 64 // side
            for p in range(side * side):
                y, x = (p // side) * cell + cell // 2, (p % side) * cell + cell // 2
                inside = [k for k, m in enumerate(masks) if m[y, x]]
                if len(inside) == 1:
                    o = scene.objects[inside[0]]
                    labels[p] = torch.tensor([list(COLORS).index(o.color), list(SHAPES).index(o.shape),
                                              int(o.size == "large")])
            rows.append((split, request_kind(task, request), features, torch.tensor(ids), states, target, labels))
    width = max(len(r[3]) for r in rows)
    patches = torch.stack([r[2] for r in rows])
    targets = torch.stack([r[5] for r in rows])
    labels = torch.stack([r[6] for r in rows])
    ids = torch.full((len(rows), width), tower.config.pad_token_id)
    states = torch.zeros(len(rows), width, tower.config.hidden_size)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r[3])], states[i, :len(r[3])], mask[i, :len(r[3])] = r[3], r[4], True
    train = torch.tensor([r[0] == "train" for r in rows])
    kinds = [r[1] for r in rows]
    variants = {"text-tower states": (lambda: nn.Identity(), tower.config.hidden_size, states),
                "learned token embeddings": (lambda: nn.Embedding(tower.config.vocab_size, 128), 128, ids)}
    variants = {k: v for k, v in variants.items() if k.split()[0].replace("text-", "") in words}
    out = {}
    for (name, (words, size, inputs)), scorer_name in itertools.product(variants.items(), scorers):
        torch.manual_seed(seed)
        scorer = SCORERS[scorer_name](patches.shape[-1], words(), size)
        name = f"{scorer_name} on {name}"
        optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-3)
        index = train.nonzero().flatten()
        for _ in range(steps):
            batch = index[torch.randint(len(index), (32,))]
            loss = F.binary_cross_entropy_with_logits(scorer(patches[batch], inputs[batch], mask[batch]),
                                                      targets[batch])
            if attribute_loss and getattr(scorer, "attribute_logits", None) is not None:  # the dense attribute loss
                for g, logits in enumerate(scorer.attribute_logits.split(scorer.GROUPS, dim=-1)):
                    loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[batch][..., g].flatten(),
                                                  ignore_index=-1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        held = (~train).nonzero().flatten()
        with torch.no_grad():
            scores = scorer(patches[held], inputs[held], mask[held])
        hit = targets[held][torch.arange(len(held)), scores.argmax(1)]
        per_kind: dict[str, list[float]] = {}
        for k, h, t in zip([kinds[i] for i in held.tolist()], hit.tolist(), targets[held].sum(1).tolist()):
            if t > 0:  # a request naming something in the image
                per_kind.setdefault(k, []).append(h)
        out[name] = {k: {"top_patch_in_asked": round(sum(v) / len(v), 3), "n": len(v)}
                     for k, v in sorted(per_kind.items())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="a see-model (directory or shipped name)")
    parser.add_argument("--requests", type=int, default=2000, help="training requests of the selection probe")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--scorers", nargs="+", choices=sorted(SCORERS), default=sorted(SCORERS),
                        help="the selection scorers to compare")
    parser.add_argument("--skip-attributes", action="store_true", help="only the selection probe")
    parser.add_argument("--words", nargs="+", choices=("tower", "learned"), default=("tower", "learned"),
                        help="how the scorers read the request: the text tower's states, learned token embeddings")
    parser.add_argument("--no-attribute-loss", action="store_true",
                        help="train the factored scorer's patch attributes by the selection loss alone")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    model, processor = MMBridgeModel.from_pretrained(path).eval(), MMBridgeProcessor.from_pretrained(path)
    tower = AutoModel.from_pretrained(SHIPPED_FOUNDATION / "text_encoder").eval()
    start = time.time()
    if not args.skip_attributes:
        print({"attributes": attribute_probe(model, processor, 1200, 300)})
    print({"selection": selection_probe(model, processor, tower, args.requests, 600, args.steps, args.scorers,
                                                words=args.words, attribute_loss=not args.no_attribute_loss)})
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
