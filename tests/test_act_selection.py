"""The act decoder's selection branch: which patches a request asks for, from the text tower's words. "red
circle" asks for red AND circle: on a synthetic world where every scene holds the asked object next to one
sharing only its colour and one sharing only its shape (and requests carry words that ask nothing), the branch
learns to pick the right one. (A gated per-word AND scorer, `scripts/act_selection_probe.py`'s "conjunction",
learns this no better: 100 % both; the real selection's errors are elsewhere — docs/recipe.md, "Act".)"""

import torch
import torch.nn.functional as F

from mmbridge.modeling.act.decoder import LinkConditionedDecoder

COLOURS, SHAPES, FILLERS = 3, 3, 2
WORDS = COLOURS + SHAPES + FILLERS


def synthetic_batch(generator: torch.Generator, n: int, patches: int = 16, dim: int = 16):
    """Per scene: the asked object (colour c, shape s), a distractor of colour c and another shape, one of shape s
    and another colour, background elsewhere. Requests are [filler, colour word, filler, shape word]."""
    words = torch.randn(WORDS, 8, generator=torch.Generator().manual_seed(1))  # fixed "text tower states"
    attribute = torch.randn(COLOURS + SHAPES, dim, generator=torch.Generator().manual_seed(2))
    features = 0.1 * torch.randn(n, patches, dim, generator=generator)
    texts, targets = [], torch.zeros(n, patches)
    for i in range(n):
        c, s = torch.randint(COLOURS, (1,), generator=generator).item(), torch.randint(SHAPES, (1,),
                                                                                          generator=generator).item()
        other_c, other_s = (c + 1) % COLOURS, (s + 1) % SHAPES
        where = torch.randperm(patches, generator=generator)[:3].tolist()
        for p, (colour, shape) in zip(where, ((c, s), (c, other_s), (other_c, s))):
            features[i, p] += attribute[colour] + attribute[COLOURS + shape]
        targets[i, where[0]] = 1
        texts.append(words[[COLOURS + SHAPES, c, COLOURS + SHAPES + 1, COLOURS + s]])
    return features, torch.stack(texts), targets


def test_selection_learns_to_pick_the_object_with_every_named_attribute():
    torch.manual_seed(0)
    decoder = LinkConditionedDecoder(8, 8, 16, 1, 2, 4, None, text_hidden_size=8)
    parameters = [p for n, p in decoder.named_parameters() if n.startswith("select")]
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    data = torch.Generator().manual_seed(0)
    mask = torch.ones(64, 4, dtype=torch.bool)
    for _ in range(300):
        features, texts, targets = synthetic_batch(data, 64)
        loss = F.binary_cross_entropy_with_logits(decoder._select(features, texts, mask), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    features, texts, targets = synthetic_batch(torch.Generator().manual_seed(99), 200)
    with torch.no_grad():
        scores = decoder._select(features, texts, torch.ones(200, 4, dtype=torch.bool))
    hit = targets[torch.arange(200), scores.argmax(1)].mean().item()
    assert hit >= 0.95, hit
