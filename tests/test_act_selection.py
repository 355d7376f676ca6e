"""The act decoder's selection branch: which patches a request asks for, from the text tower's words. "red
circle" asks for red AND circle: on a synthetic world where every scene holds the asked object next to one
sharing only its colour and one sharing only its shape (and requests carry words that ask nothing), the branch
learns to pick the right one. (A gated per-word AND scorer, `scripts/act_selection_probe.py`'s "conjunction",
learns this no better: 100 % both; the real selection's errors are elsewhere — docs/recipe.md, "Act".)"""

import torch
import torch.nn.functional as F

from mmbridge.modeling.act.decoder import AttributeSelection, LinkConditionedDecoder

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


def test_attribute_selection_reads_which_values_a_request_allows():
    """The attribute-factored branch: patches classify their object's colour and shape (dense labels), one query
    per attribute reads the request's token ids; the asked object must beat both one-attribute distractors, and
    a request naming only a colour must find the objects of that colour, whatever their shape."""
    torch.manual_seed(0)
    selection = AttributeSelection(16, 16, 2, (COLOURS, SHAPES), vocab_size=WORDS)
    optimizer = torch.optim.Adam(selection.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(0)

    def batch(generator, n, colour_only=False):
        features, _, targets = synthetic_batch(generator, n)
        ids = torch.zeros(n, 4, dtype=torch.long)
        labels = torch.full((n, features.shape[1], 2), -1)
        attribute = torch.randn(COLOURS + SHAPES, 16, generator=torch.Generator().manual_seed(2))
        for i in range(n):  # recover each scene's objects from its features (synthetic_batch's layout)
            for p in range(features.shape[1]):
                scores = attribute @ features[i, p]
                if scores.max() > 3:
                    labels[i, p] = torch.tensor([scores[:COLOURS].argmax(), scores[COLOURS:].argmax()])
            c, s = labels[i][targets[i].bool()][0].tolist()
            ids[i] = torch.tensor([COLOURS + SHAPES, c, COLOURS + SHAPES + 1, COLOURS + s])
            if colour_only:
                ids[i, 3] = COLOURS + SHAPES + 1
                targets[i] = (labels[i, :, 0] == c).float()
        return features, ids, targets, labels

    for step in range(300):
        features, ids, targets, labels = batch(data, 64, colour_only=step % 2 == 1)
        score, attributes = selection(features, ids, None)
        loss = F.binary_cross_entropy_with_logits(score, targets)
        for g, logits in enumerate(attributes.split((COLOURS, SHAPES), dim=-1)):
            loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[..., g].flatten(), ignore_index=-1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for colour_only in (False, True):
        features, ids, targets, _ = batch(torch.Generator().manual_seed(99), 200, colour_only)
        with torch.no_grad():
            score, _ = selection(features, ids, torch.ones_like(ids, dtype=torch.bool))
        assert targets[torch.arange(200), score.argmax(1)].mean().item() >= 0.95, colour_only
