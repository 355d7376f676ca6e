"""Does a generator's text tower keep each object's colour at that object's own tokens? Linear probes on the
last hidden states (what the UNet cross-attends to) of 2-object draw captions ("a large cyan circle to the left
of a small white diamond"): from the state at the first / second object's colour or shape word, predict the
first / second object's colour (70 / 30 split of ~2,600 captions, softmax regression on standardised states).

CLIP's text transformer is causal, so the second object's words also see the first object's; run o1's
analysis (docs/recipe.md, Draw) found the state at the second shape word tells the *first* object's colour
better than its own — the second object of 2-object drawings is the one that takes the other's colour.

    python scripts/text_tower_binding_probe.py [GENERATOR_DIR]   # default: the shipped foundation's

Not a library module.
"""

import random
import sys

import torch
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from mmbridge.data.shapes.world import COLORS, SHAPES
from mmbridge.tokenization import with_final_word_token

RELATIONS = ("above", "below", "to the left of", "to the right of")
#: probe name -> (which object's word: 0 / 1, "colour" or "shape" word, whose colour is predicted: 0 / 1)
PROBES = {"own colour at object 1's colour word": (0, "colour", 0),
          "own colour at object 2's colour word": (1, "colour", 1),
          "own colour at object 1's shape word": (0, "shape", 0),
          "own colour at object 2's shape word": (1, "shape", 1),
          "object 1's colour at object 2's shape word": (1, "shape", 0)}


def captions(n: int, seed: int = 0) -> list[tuple[str, list[tuple[str, str, str]]]]:
    rng, colors, items = random.Random(seed), list(COLORS), []
    while len(items) < n:
        objects = [(rng.choice(["small", "large"]), rng.choice(colors), rng.choice(SHAPES)) for _ in range(2)]
        if objects[0][1] != objects[1][1]:  # two colours, so "whose colour" is decidable
            items.append((f"a {' '.join(objects[0])} {rng.choice(RELATIONS)} a {' '.join(objects[1])}", objects))
    return items


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 500) -> float:
    train = int(len(labels) * 0.7)
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], 1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x[:train] @ weight + bias, labels[:train])
        loss = loss + 1e-3 * weight.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ((x[train:] @ weight + bias).argmax(1) == labels[train:]).float().mean().item()


def main(generator: str = "src/mmbridge/assets/foundation/shapes/generator") -> None:
    tower = CLIPTextModel.from_pretrained(f"{generator}/text_encoder").eval()
    tokenizer = with_final_word_token(PreTrainedTokenizerFast.from_pretrained(f"{generator}/tokenizer"))
    items, colors = captions(2600), list(COLORS)
    batch = tokenizer([c for c, _ in items], padding="max_length", max_length=64, return_tensors="pt")
    with torch.no_grad():
        states = tower(batch.input_ids, attention_mask=batch.attention_mask)[0]
    features = {name: [] for name in PROBES}
    labels = {name: [] for name in PROBES}
    for i, (_, objects) in enumerate(items):
        tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[i])
        words = [t.replace("Ġ", "") for t in tokens]  # this tokenizer marks a word's end with "Ġ"
        where = {"colour": [j for j, w in enumerate(words) if w in COLORS],
                 "shape": [j for j, w in enumerate(words) if w in SHAPES]}
        if len(where["colour"]) != 2 or len(where["shape"]) != 2:
            continue  # a colour or shape name split into pieces: not this probe's case
        for name, (word_of, kind, colour_of) in PROBES.items():
            features[name].append(states[i, where[kind][word_of]])
            labels[name].append(colors.index(objects[colour_of][1]))
    for name in PROBES:
        accuracy = probe_accuracy(torch.stack(features[name]), torch.tensor(labels[name]), len(colors))
        print(f"{name}: {accuracy:.3f} ({len(labels[name])} captions)")


if __name__ == "__main__":
    main(*sys.argv[1:])
