"""ShapesWorld samples for every stage of the see recipe, drawn on the fly from the world's seeds.

Scenes are generated from `(split, index)`, so a stage can draw as many fresh training scenes as it
needs and the test split is never touched. The LM's text mirrors the chat template exactly, with
the scene's detailed description standing where the image's soft prompt will later stand:
`###Human: <Img>{description}</Img> {question} ###Assistant: {answer}###Human: …` — the frozen LM
can only read from image tokens what it learned to read from this text (docs/recipe.md, "Design choices, and why").
"""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import torch

from mmbridge.data.shapes.annotations import article, description, qa_pairs, relation_facts, short_caption
from mmbridge.data.shapes.world import COLORS, SHAPES, SIZES, coverage_map, make_scene, relation, render, rng_for
from mmbridge.pretrain.text import Branches
from mmbridge.pretrain.vision import patch_labels
from mmbridge.train.config import ConfigError

#: Training scenes are indexed 0..TRAIN_SCENES-1 (the world's seeds keep splits disjoint).
TRAIN_SCENES = 1_000_000
END = "###"


def balanced_questions(pool: list[dict], rng: random.Random, num: int) -> list[dict]:
    """Up to `num` questions of `pool`, each turn first drawing a question type (uniformly among the
    types left), then a question of that type.

    Drawing from the pool directly skews lookups to small scenes (a 4-object scene has ~45 questions,
    mostly relations; a 1-object scene 6), where "copy the first colour" is always right; by type,
    colour/shape/size questions come from 3-4-object scenes about as often as in the eval.
    """
    by_type: dict[str, list[dict]] = {}
    for q in pool:
        by_type.setdefault(q["type"], []).append(q)
    picked = []
    while len(picked) < num and by_type:
        qtype = rng.choice(sorted(by_type))
        questions = by_type[qtype]
        picked.append(questions.pop(rng.randrange(len(questions))))
        if not questions:
            del by_type[qtype]
    return picked


def qa_turns(scene, rng: random.Random, num_qa: int) -> list[tuple[str, str]]:
    """Up to `num_qa` (question, answer) turns, balanced by type: canonical and varied wording,
    sometimes "Describe the image."."""
    seed = rng.randrange(1 << 30)
    pool = qa_pairs(scene, rng_for(seed, 3), varied=rng.random() < 0.3, include_describe=False)
    turns = [(q["question"], q["answer"]) for q in balanced_questions(pool, rng, num_qa)]
    if rng.random() < 0.3:
        turns.insert(rng.randrange(len(turns) + 1), ("Describe the image.", short_caption(scene)))
    return turns


IMG_PREFIX = "###Human: <Img>"


def first_turn(context: str, question: str) -> list[tuple[str, bool]]:
    """The prompt of a chat's first turn as segments, encoded one by one exactly as in training:
    the context trains, the template around it does not."""
    return [(IMG_PREFIX, False), (context, True), (f"</Img> {question} ###Assistant: ", False)]


def chat_text(context: str, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The MiniGPT-4 template as (text, trained) segments: the context and the answers train, the
    prompts do not."""
    segments = []
    for i, (question, answer) in enumerate(turns):
        segments += first_turn(context, question) if i == 0 else [(f"Human: {question} ###Assistant: ", False)]
        segments.append((answer + END, True))
    return segments


def relation_sentences(scene, rng: random.Random) -> list[str]:
    """The facts of `relation_facts`, each pair stated both ways round ("A is left of B" and "B is right
    of A"), in random order.

    `relation_facts` lists pairs in a fixed order (0,1), (0,2), …, so a model trained on it predicts
    the k-th sentence's names by position; shuffled, a name can only be completed by finding the object
    in the text before (content lookup: induction). Both ways round (experiment r7): with each pair
    stated once, in a random direction, the answer to "Is A left of B?" is the XOR of two things the LM
    must find (is the pair stated as A..B or B..A; is the stated word the asked one or its mirror), and
    neither alone says anything about the answer — a parity that gradient descent does not find (run r6
    said "no" to 87 % of relation questions after 3,000 steps, 51 % right even with two objects). With
    both directions stated, the answer is a lookup: does the sentence "The A is … the B." hold the
    asked word.
    """
    sentences = []
    for a, b in itertools.permutations(scene.objects, 2):
        rx, ry = relation(a, b, "x"), relation(a, b, "y")
        words = (([] if not rx else ["left of" if rx > 0 else "right of"])
                 + ([] if not ry else ["above" if ry > 0 else "below"]))
        if words:
            sentences.append(f"The {a.name} is {' and '.join(words)} the {b.name}.")
    rng.shuffle(sentences)
    return sentences


def object_words(text: str) -> str:
    """Every "size colour shape" mention as one word ("large red circle" -> "largeredcircle"): one token
    per object, so that every question is a one-hop lookup (find the object token whose embedding has
    the asked-about attribute, read another attribute off the same token) instead of a lookup of the
    word *before* the named one (experiment r6)."""
    return _MENTION.sub(lambda m: m["size"] + m["color"] + m["shape"], text)


def lm_description(scene, rng: random.Random, object_tokens: bool = True) -> str:
    """`description(scene)` with its relation sentences from `relation_sentences`, every object one
    word (`object_words`; `object_tokens=False`: the word form): the LM's pretraining text. Captions and
    later stages keep `description` as is (a fixed order is easier to generate)."""
    text, facts = description(scene), relation_facts(scene)
    head = text.removesuffix(" " + " ".join(facts)) if facts else text
    text = " ".join([head] + relation_sentences(scene, rng))
    return object_words(text) if object_tokens else text


def attribute_sentences(scene, rng: random.Random) -> str:
    """Every object's attributes restated, looked up from the description, in random order: "The
    circle is large and red." (where the shape names one object), "The red one is a circle." (where
    the colour does) and "The red circle is large.".

    The description names every object size -> colour -> shape, so its dense loss only trains
    *forward* lookup (find "red", continue with "circle"); colour and size questions need the word
    *before* the named shape. Restating the facts in the answers' orders trains those lookups on
    every description instead of on one question per scene.
    """
    sentences = []
    for o in scene.objects:
        if len(scene.find(shape=o.shape)) == 1:
            sentences.append(f"The {o.shape} is {o.size} and {o.color}.")
        if len(scene.find(color=o.color)) == 1:
            sentences.append(f"The {o.color} one is {article(o.shape)} {o.shape}.")
        if len(scene.find(o.color, o.shape)) == 1:
            sentences.append(f"The {o.color} {o.shape} is {o.size}.")
    rng.shuffle(sentences)
    return " ".join(sentences)


def relative_sentences(scene, rng: random.Random) -> str:
    """Every pairwise relation restated with both names *before* the relation words, in random
    order and direction: "Compared with the blue square, the red circle is to the left and above."
    — the two lookups and the mirror a relation question needs ("Is the red circle to the left of
    the blue square?"), trained on every description. Empty where no pair is apart by the margin or
    a colour-shape name is not unique."""
    sentences = []
    unique = [o for o in scene.objects if len(scene.find(o.color, o.shape)) == 1]
    for a, b in itertools.combinations(unique, 2):
        if rng.random() < 0.5:
            a, b = b, a
        rx, ry = relation(a, b, "x"), relation(a, b, "y")
        words = (([] if not rx else ["to the left" if rx > 0 else "to the right"])
                 + ([] if not ry else ["above" if ry > 0 else "below"]))
        if words:
            relative = " and ".join(words)
            sentences.append(f"Compared with the {b.color} {b.shape}, the {a.color} {a.shape} is {relative}.")
    rng.shuffle(sentences)
    return " ".join(sentences)


#: Turns of every LM dialogue whose long answers restate the description's facts in the orders the
#: questions ask them (see `attribute_sentences`, `relative_sentences`).
RESTATEMENTS = (("Describe each shape.", attribute_sentences),
                ("Where are the shapes relative to each other?", relative_sentences))


def relation_turns(scene, rng: random.Random, num: int) -> list[tuple[str, str]]:
    """`num` more relation questions (any wording): the one lookup with two names and a direction,
    learnt last (run r7), gets more of the answers' loss."""
    seed = rng.randrange(1 << 30)
    pool = qa_pairs(scene, rng_for(seed, 3), varied=True, include_describe=False)
    pool = [q for q in pool if q["type"] == "relation"]
    return [(q["question"], q["answer"]) for q in rng.sample(pool, min(num, len(pool)))]


def lm_dialogue(rng: random.Random, num_qa: int = 6, split: str = "train", extra_relation_qa: int = 2) -> Branches:
    """Text-only first turns about one scene, each seeing the description but not the other turns.

    The description is trained too: its shuffled relation sentences repeat object names, which is the
    copy-by-content skill (induction) that answering needs. As one multi-turn chat, 82 % of the later
    colour/shape answers were already in an earlier turn ("What size is the red circle?" before
    "What color is the circle?") and "mentioned before" told 83 % of the exists answers: a shortcut
    nearer than the description, and useless on the first turn, which is what the eval asks.
    """
    scene = make_scene(split, rng.randrange(TRAIN_SCENES), 0)
    context = lm_description(scene, rng)
    # restatements first: a row cut at `max_length` loses a question, not them
    turns = [(question, text) for question, restate in RESTATEMENTS if (text := restate(scene, rng))]
    turns += qa_turns(scene, rng, num_qa) + relation_turns(scene, rng, extra_relation_qa)
    turns = [chat_text(context, [turn])[2:] for turn in turns]
    return Branches(first_turn(context, "")[:2], turns)


def lm_samples(rng: random.Random, n: int) -> list[Branches]:
    return [lm_dialogue(rng) for _ in range(n)]


def lm_corpus(num: int, seed: int = 0) -> list[str]:
    """Plain text for training the tokenizer (train split only)."""
    rng = random.Random(seed)
    return [lm_dialogue(rng).text() for _ in range(num)]


# -- vision ---------------------------------------------------------------------------------------
#: Per-patch classes the ViT learns beside CLIP's loss (class 0 = background). `column`/`row`: the
#: covering object's centre on a 24 × 24 grid — CLIP's captions never say where things are, and
#: without it the ViT's object features carried no position (linear probe of the 3 × 3 region:
#: 19 %, `vision_probes`), so no bridge could answer relation questions from the image. 24 bins, not
#: 8: the description's 3 × 3 regions (thirds of 64 px) are unions of 8 bins each, so a region is a
#: linear read-out of the bin features, and a bin (2.7 px) is finer than the relation margin (4 px).
#: With 8 bins, two of them straddle the thirds' borders: the region probe stopped at 90.6 % after
#: 4,000 steps (run r7v), while colour, shape and size reached 99.5-100 %.
POSITION_BINS = 24
DENSE_TARGETS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": 3,
                 "column": POSITION_BINS + 1, "row": POSITION_BINS + 1}


def image_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) in [-1, 1] (the processors of shapes models use mean = std = 0.5)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def vision_batch(rng: random.Random, n: int, tokenizer, patch_size: int, split: str = "train") -> dict:
    """Images, their short captions (CLIP text) and per-patch color/shape/size labels."""
    scenes = [make_scene(split, rng.randrange(TRAIN_SCENES), 0) for _ in range(n)]
    pixels = torch.stack([image_tensor(render(s)) for s in scenes])
    # CLIP's text tower pools the hidden state at the first EOS: without one every caption pools its
    # first token, all texts look alike and the contrastive loss sits at log(batch) forever.
    texts = tokenizer([short_caption(s) + tokenizer.eos_token for s in scenes], return_tensors="pt", padding=True)
    dense = {name: [] for name in DENSE_TARGETS}
    for s in scenes:
        masks = [coverage_map(o) > 0.5 for o in s.objects]
        size = pixels.shape[-1]
        colors = [list(COLORS).index(o.color) + 1 for o in s.objects]
        dense["color"].append(patch_labels(masks, colors, size, patch_size))
        dense["shape"].append(patch_labels(masks, [SHAPES.index(o.shape) + 1 for o in s.objects], size, patch_size))
        dense["size"].append(patch_labels(masks, [1 + (o.size == "large") for o in s.objects], size, patch_size))
        bins = [tuple(min(int(c * POSITION_BINS / size), POSITION_BINS - 1) for c in o.centre) for o in s.objects]
        dense["column"].append(patch_labels(masks, [1 + col for col, _ in bins], size, patch_size))
        dense["row"].append(patch_labels(masks, [1 + row for _, row in bins], size, patch_size))
    return {"pixel_values": pixels, "input_ids": texts["input_ids"], "attention_mask": texts["attention_mask"],
            "dense_labels": {k: torch.stack(v) for k, v in dense.items()}}


# -- composing and checking ------------------------------------------------------------------------
def shapes_processor(tokenizer, num_query_tokens: int, image_size: int = 64, instruction: bool = False):
    """MiniGPT-4 template and stop string; images scaled to [-1, 1] exactly as `image_tensor` does.
    `instruction`: the Q-Former is instruction-aware (its text starts with the tokenizer's BOS as CLS)."""
    from transformers import BlipImageProcessorPil

    from mmbridge.processing import PRESET_STOP_STRINGS, MMBridgeProcessor, chat_template_preset

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return MMBridgeProcessor(image_processor, tokenizer, chat_template=chat_template_preset("minigpt4"),
                             num_query_tokens=num_query_tokens, stop_strings=PRESET_STOP_STRINGS["minigpt4"],
                             qformer_cls_token_id=tokenizer.bos_token_id if instruction else None,
                             qformer_max_length=64)


@torch.no_grad()
def _text_answers(lm, tokenizer, num_scenes: int, split: str, keep) -> tuple[list[dict], list[int], list[str]]:
    """The canonical questions `keep(question)` selects on `num_scenes` scenes of `split`, the number of
    objects in each one's scene, and the LM's greedy answers from the description in its own form
    (`lm_description`, a fixed shuffle per scene)."""
    from mmbridge.data.shapes.dataset import eval_questions
    from mmbridge.pretrain.text import greedy_answers

    prompts, questions, objects = [], [], []
    for i in range(num_scenes):
        scene = make_scene(split, i, 0)
        for q in eval_questions(scene):
            if keep(q):
                prompts.append(first_turn(lm_description(scene, random.Random(i)), q["question"]))
                questions.append(q)
                objects.append(len(scene.objects))
    return questions, objects, greedy_answers(lm, tokenizer, prompts, END)


def text_qa_accuracy(lm, tokenizer, num_scenes: int = 100, split: str = "val") -> dict[str, float]:
    """The frozen LM's ceiling: canonical questions answered from the description given as text, in the
    form the LM reads (`lm_description`, a fixed shuffle per scene)."""
    from mmbridge.data.shapes.metrics import vqa_match

    questions, _, predictions = _text_answers(lm, tokenizer, num_scenes, split, lambda q: q["type"] != "describe")
    return accuracy_by_type([vqa_match(p, q["answer"]) for p, q in zip(predictions, questions)],
                            [q["type"] for q in questions])


def relation_breakdown(lm, tokenizer, num_scenes: int = 100, split: str = "val") -> dict[str, float]:
    """Text-only accuracy of the relation questions split by true answer (yes / no), by objects in the
    scene, and the share answered "no": an LM that has learnt the prior rather than the lookup scores
    ~100 % on one answer and ~0 % on the other (run r6: "no" 87 %, yes-questions 15 % right)."""
    from mmbridge.data.shapes.metrics import vqa_match

    questions, objects, predictions = _text_answers(lm, tokenizer, num_scenes, split,
                                                    lambda q: q["type"] == "relation")
    correct = [vqa_match(p, q["answer"]) for p, q in zip(predictions, questions)]
    out = accuracy_by_type(correct, [f"answer_{q['answer']}" for q in questions])
    by_objects = accuracy_by_type(correct, [f"objects_{n}" for n in objects])
    out.update({k: v for k, v in by_objects.items() if k not in ("all", "n")})
    out["said_no"] = round(sum(vqa_match(p, "no") for p in predictions) / max(len(predictions), 1), 4)
    return out


_MENTION = re.compile(rf"(?P<size>{'|'.join(SIZES)}) (?P<color>{'|'.join(COLORS)}) (?P<shape>{'|'.join(SHAPES)})")


def shape_word_targets(scene, rng: random.Random) -> tuple[str, list[int]]:
    """A shuffled description (`lm_description`, word form) and the character offsets of the shape words
    in its relation sentences whose size and colour name one object only (the shape follows from the
    text). Since run r6 the LM trains on the one-word-per-object form, so for LMs trained since, this
    check measures a form they do not see (kept to compare with runs r0-r5)."""
    text = lm_description(scene, rng, object_tokens=False)
    start = text.index(". The ") + 2 if ". The " in text else len(text)
    named = [(o.size, o.color) for o in scene.objects]
    unique = {n for n in named if named.count(n) == 1}
    return text, [m.start("shape") for m in _MENTION.finditer(text, start) if (m["size"], m["color"]) in unique]


@torch.no_grad()
def retrieval_check(lm, tokenizer, num_scenes: int = 100, split: str = "val") -> dict[str, float]:
    """Loss and accuracy of the shape word's (first) token in shuffled relation sentences of held-out
    scenes with >= 3 objects, teacher-forced. It tells an LM that retrieves by content (loss -> 0)
    from one that has not learned yet (≈ ln 5 = 1.61) and one that copies by position (> 2) long
    before text-only QA moves."""
    rows, targets, scene_index = [], [], 0
    while len(rows) < num_scenes:
        scene = make_scene(split, scene_index, 0)
        scene_index += 1
        if len(scene.objects) < 3:
            continue
        text, offsets = shape_word_targets(scene, random.Random(scene_index))
        prefix = tokenizer(IMG_PREFIX, add_special_tokens=False)["input_ids"]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = {begin: k for k, (begin, _) in enumerate(enc["offset_mapping"])}
        rows.append(prefix + enc["input_ids"])
        targets.append([len(prefix) + starts[o] for o in offsets if o in starts])
    losses, hits = [], []
    for i in range(0, len(rows), 32):
        batch, positions = rows[i:i + 32], targets[i:i + 32]
        width = max(len(r) for r in batch)
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in batch])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
        logits = lm(input_ids=ids, attention_mask=mask).logits.float()
        for b, pos in enumerate(positions):
            for p in pos:
                losses.append(torch.nn.functional.cross_entropy(logits[b, p - 1], ids[b, p]).item())
                hits.append(int(logits[b, p - 1].argmax()) == int(ids[b, p]))
    return {"loss": round(sum(losses) / max(len(losses), 1), 4), "acc": round(sum(hits) / max(len(hits), 1), 4),
            "n": len(losses)}


_RESTATED = (  # (regex over one restatement sentence, {group: the lookup it tests})
    (re.compile(r"The \w+ is (?P<size>\w+) and (?P<color>\w+)\."), {"size": "shape->size", "color": "shape->color"}),
    (re.compile(r"The \w+ one is an? (?P<shape>\w+)\."), {"shape": "color->shape"}),
    (re.compile(r"The \w+ \w+ is (?P<size>\w+)\."), {"size": "name->size"}),
    (re.compile(r"Compared with the \w+ \w+, the \w+ \w+ is (?P<rel>to the \w+|above|below)"),
     {"rel": "names->relation"}),
)


@torch.no_grad()
def lookup_check(lm, tokenizer, num_scenes: int = 60, split: str = "val") -> dict[str, float]:
    """Teacher-forced accuracy of the looked-up words in the restatement answers ("Describe each
    shape.", "Where are the shapes relative to each other?") on held-out scenes, per lookup: the
    backward ones colour and size questions need (shape -> colour/size), the forward one shape
    questions need (colour -> shape), and the two-name relation. It shows which lookup the LM has
    not learned while text QA still averages over them."""
    hits: dict[str, list[bool]] = {}
    for i in range(num_scenes):
        scene = make_scene(split, i, 0)
        for question, restate in RESTATEMENTS:
            answer = restate(scene, random.Random(i))
            if not answer:
                continue
            prompt = first_turn(lm_description(scene, random.Random(i)), question)
            ids = [t for text, _ in prompt for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
            enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
            starts = {begin: k for k, (begin, _) in enumerate(enc["offset_mapping"])}
            logits = lm(input_ids=torch.tensor([ids + enc["input_ids"]])).logits[0].float()
            for sentence in re.finditer(r"[^.]+\.", answer):
                for pattern, lookups in _RESTATED:
                    m = pattern.match(sentence[0].strip())
                    if not m:
                        continue
                    offset = sentence.start() + len(sentence[0]) - len(sentence[0].lstrip())
                    for group, lookup in lookups.items():
                        k = starts.get(offset + m.start(group))
                        if k is not None:
                            position = len(ids) + k
                            hits.setdefault(lookup, []).append(
                                int(logits[position - 1].argmax()) == enc["input_ids"][k])
                    break
    return {lookup: round(sum(h) / len(h), 4) for lookup, h in sorted(hits.items())}


PROBES = ("color", "shape", "size", "region")  # per object, from the features of the patches it covers


def _object_features(vision, split: str, num: int, patch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean frozen-ViT patch feature over each object's patches (>= 50 % covered, else its most covered
    one) and the object's labels, for scenes 0..num-1 of `split`."""
    from mmbridge.data.shapes.annotations import region

    regions = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
    feats, labels = [], {name: [] for name in PROBES}
    for start in range(0, num, 128):
        scenes = [make_scene(split, i, 0) for i in range(start, min(start + 128, num))]
        pixels = torch.stack([image_tensor(render(s)) for s in scenes])
        patches = vision(pixel_values=pixels).last_hidden_state[:, 1:]  # drop CLS
        grid = pixels.shape[-1] // patch_size
        for b, scene in enumerate(scenes):
            for o in scene.objects:
                cover = torch.as_tensor(coverage_map(o), dtype=torch.float32)
                cover = cover.reshape(grid, patch_size, grid, patch_size).mean((1, 3)).flatten()
                chosen = cover >= 0.5 if (cover >= 0.5).any() else cover == cover.max()
                feats.append(patches[b, chosen].mean(0))
                labels["color"].append(list(COLORS).index(o.color))
                labels["shape"].append(list(SHAPES).index(o.shape))
                labels["size"].append(list(SIZES).index(o.size))
                labels["region"].append(regions.index(region(o)))
    return torch.stack(feats), {k: torch.tensor(v) for k, v in labels.items()}


@torch.no_grad()
def vision_probes(vision, patch_size: int, num_train: int = 1000, num_val: int = 500, steps: int = 300) -> dict:
    """The foundation ViT's gate (what the Q-Former can only pass on if the ViT has it): linear probes
    on frozen per-object features for colour, shape, size and coarse position (3×3 region), fitted
    on train scenes and scored on held-out val scenes. Logistic regression by full-batch Adam."""
    vision.eval()
    x_train, y_train = _object_features(vision, "train", num_train, patch_size)
    x_val, y_val = _object_features(vision, "val", num_val, patch_size)
    out = {name: linear_probe(x_train, y_train[name], x_val, y_val[name], steps) for name in PROBES}
    out["objects_val"] = int(x_val.shape[0])
    return out


@torch.no_grad()
def linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                 steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression (standardised features, full-batch Adam, small L2)
    fitted on (x_train, y_train): what a linear read-out finds in frozen features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    classes = int(max(y_train.max(), y_val.max())) + 1
    probe = torch.nn.Linear(x_train.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05 if x_train.shape[1] < 512 else 0.01)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(probe(x_train), y_train) + 1e-4 * probe.weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return round(float((probe(x_val).argmax(-1) == y_val).float().mean()), 4)


def _probe_items(split: str, num: int, kind: str, rng: random.Random) -> list[tuple]:
    """(scene, instruction, label) for `soft_prompt_probes`: `single_*` one-object scenes described;
    `bound_color` / `bound_shape` scenes of 2-4 objects, asked about one object named by a shape / colour
    that is unique in its scene, labelled with that object's other attribute."""
    items, index = [], 0
    while len(items) < num:
        scene = make_scene(split, index, 0)
        index += 1
        if kind.startswith("single") != (len(scene.objects) == 1):
            continue
        if kind == "single_color":
            items.append((scene, "Describe the image.", list(COLORS).index(scene.objects[0].color)))
            continue
        key, read = ("shape", "color") if kind == "bound_color" else ("color", "shape")
        named = [o for o in scene.objects if sum(getattr(p, key) == getattr(o, key) for p in scene.objects) == 1]
        if named:
            o = rng.choice(named)
            question = f"What color is the {o.shape}?" if key == "shape" else f"What shape is the {o.color} object?"
            items.append((scene, question, list(COLORS if read == "color" else SHAPES).index(getattr(o, read))))
    return items


@torch.no_grad()
def soft_prompt_probes(model, tokenizer, num_train: int = 1500, num_val: int = 400) -> dict[str, float]:
    """Linear probes on the flattened soft prompt (what the frozen LM receives for an image):
    `single_color` — the colour of a one-object scene; `bound_color` / `bound_shape` — with 2-4 objects,
    the colour of the object the instruction names by shape (the shape of the one named by colour).

    A soft prompt can carry every attribute and still lose which belongs to which object: run b7
    answered colour 100 % on one-object scenes and 28-43 % with more, 135 of 140 wrong answers naming
    another object's colour; its soft prompt gave single_color 100 % and bound_color 46.5 %. The bound
    probes need an instruction-aware Q-Former (the question chooses the object); without one they are
    left out."""
    from mmbridge.tokenization import tokenize_qformer_text

    kinds = ["single_color"] + (["bound_color", "bound_shape"] if model.config.qformer_instruction else [])
    out = {}
    for kind in kinds:
        features = {}
        for split, num in (("train", num_train), ("val", num_val)):
            items = _probe_items(split, num, kind, random.Random(0))
            rows = []
            for start in range(0, len(items), 64):
                batch = items[start:start + 64]
                pixels = torch.stack([image_tensor(render(scene)) for scene, _, _ in batch])
                ids, mask = tokenize_qformer_text(tokenizer, [q for _, q, _ in batch], tokenizer.bos_token_id)
                if not model.config.qformer_instruction:
                    ids = mask = None
                rows.append(model.get_image_features(pixels, ids, mask).flatten(1).float())
            features[split] = (torch.cat(rows), torch.tensor([label for _, _, label in items]))
        out[kind] = linear_probe(*features["train"], *features["val"])
    return out


def accuracy_by_type(correct: list[bool], types: list[str]) -> dict[str, float]:
    out = {"all": round(sum(correct) / max(len(correct), 1), 4), "n": len(correct)}
    for t in sorted(set(types)):
        hits = [c for c, ty in zip(correct, types) if ty == t]
        out[t] = round(sum(hits) / len(hits), 4)
    return out


#: The Q-Former's object heads for ShapesWorld (MMBridgeConfig.qformer_object_attributes).
OBJECT_ATTRIBUTES = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}


def scene_objects(scene) -> list[dict]:
    """A scene's objects as a shard's JSON `"objects"`: pixel box [x0, y0, x1, y1] and attribute labels."""
    return [{"box": list(o.box), "color": o.color, "shape": o.shape, "size": o.size} for o in scene.objects]


@torch.no_grad()
def object_slot_accuracy(model, split: str, num: int) -> dict[str, float]:
    """`QueryObjectHeads.accuracy` of the Q-Former's queries (image alone) on `num` scenes of `split`."""
    from mmbridge.train.data import image_objects

    model.eval()
    features, _ = scene_features(model, split, num)
    queries = torch.cat([model.qformer(features[i:i + 128]) for i in range(0, num, 128)])
    objects = []
    for i in range(num):
        scene = make_scene(split, i, 0)
        objects.append(image_objects({"objects": scene_objects(scene)}, render(scene)))
    return {k: round(v, 4) for k, v in model.qformer.objects.accuracy(queries, objects).items()}


@torch.no_grad()
def scene_features(model, split: str, num: int, start: int = 0,
                   batch_size: int = 128) -> tuple[torch.Tensor, list[str]]:
    """Frozen-ViT features and short captions of scenes `start .. start+num` of a split."""
    feats, texts = [], []
    for i in range(start, start + num, batch_size):
        scenes = [make_scene(split, j, 0) for j in range(i, min(i + batch_size, start + num))]
        feats.append(model.vision(torch.stack([image_tensor(render(s)) for s in scenes])))
        texts += [short_caption(s) for s in scenes]
    return torch.cat(feats), texts


def write_stage_data(out, num_scenes: int, qa_per_scene: int, single_qa_per_scene: int = 0, seed: int = 0) -> dict:
    """Training files for stages 2 and 3, in the formats users bring their own data in:
    webdataset shards of (image, short caption) and (image, detailed description) for alignment,
    and LLaVA JSON chats for the template stage: per scene one chat of `qa_per_scene` turns
    (sometimes with a description request) and `single_qa_per_scene` one-question chats."""
    from pathlib import Path

    from mmbridge.data.formats.llava import write_llava
    from mmbridge.data.formats.webdataset import ShardWriter
    from mmbridge.data.shapes.world import png_bytes

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 3)
    records = []
    with ShardWriter(str(out / "captions" / "shard-%04d.tar"), 2000) as captions, \
            ShardWriter(str(out / "descriptions" / "shard-%04d.tar"), 2000) as descriptions:
        for i in range(num_scenes):
            scene = make_scene("train", i, 0)
            key = f"train-{i:06d}"
            png = png_bytes(render(scene))
            (out / "images" / f"{key}.png").write_bytes(png)
            meta = {"objects": scene_objects(scene)}  # labels for the Q-Former's object loss
            captions.write({"__key__": key, "png": png, "txt": short_caption(scene), "json": meta})
            descriptions.write({"__key__": key, "png": png, "txt": description(scene), "json": meta})
            messages = []
            for question, answer in qa_turns(scene, rng, qa_per_scene):
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            records.append(to_llava_record(key, messages))
            singles = qa_turns(scene, rng, single_qa_per_scene)[:single_qa_per_scene] if single_qa_per_scene else []
            for question, answer in singles:
                records.append(to_llava_record(key, [{"role": "user", "content": question},
                                                     {"role": "assistant", "content": answer}]))
    write_llava(records, str(out / "instruct.json"))
    return {"scenes": num_scenes, "chats": len(records), "turns": sum(len(r["conversations"]) // 2 for r in records)}


def to_llava_record(key: str, messages: list[dict]) -> dict:
    from mmbridge.data.formats.llava import to_llava

    return to_llava(key, f"images/{key}.png", messages)


def frozen_parts_identical(before, after) -> bool:
    """Every parameter and buffer of the frozen components (vision, LLM) is bit-identical. LoRA adapters
    are not the LLM's own weights: they wrap its layers (`q_proj.weight` -> `q_proj.base_layer.weight`);
    rows a head appends for its tokens are not either."""
    from mmbridge.modeling.model import is_llm_adapter

    a = {k.replace(".base_layer.", "."): v for k, v in before.state_dict().items() if not is_llm_adapter(k)}
    b = {k.replace(".base_layer.", "."): v for k, v in after.state_dict().items() if not is_llm_adapter(k)}
    keys = [k for k in a if k.startswith(("vision.", "llm."))]
    # a head's added tokens ([IMG0], [DET], ...) append rows to the embeddings: the LLM's own rows must hold
    return bool(keys) and all(k in b and torch.equal(a[k], b[k][:len(a[k])]) for k in keys)


class LMGateFailed(ConfigError):
    """The LM is not good enough to freeze. A ConfigError because the remedy is a setting: more LM
    steps, or a lower gate (`lm_gate.min_accuracy=0`) to continue anyway."""


def check_lm_gate(accuracy: dict, min_accuracy: float, min_type_accuracy: float) -> None:
    """Raise `LMGateFailed` unless text-only QA is at least `min_accuracy` overall and
    `min_type_accuracy` for every question type: a frozen LM caps what the see-model can answer."""
    per_type = {k: v for k, v in accuracy.items() if k not in ("all", "n")}
    weak = {k: v for k, v in per_type.items() if v < min_type_accuracy}
    if accuracy["all"] >= min_accuracy and not weak:
        return
    types = ", ".join(f"{k} {100 * v:.1f}" for k, v in sorted(per_type.items()))
    raise LMGateFailed(
        f"LM gate: text-only QA on held-out scenes is {100 * accuracy['all']:.1f} % ({types}); the gate needs "
        f"{100 * min_accuracy:.0f} % overall and {100 * min_type_accuracy:.0f} % per type. A frozen LM caps the "
        "see-model at what it answers from text: train it longer or differently (lm.*) in a fresh output "
        "directory, or pass lm_gate.min_accuracy=0 lm_gate.min_type_accuracy=0 to continue with this one.")
