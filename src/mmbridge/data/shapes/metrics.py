"""Scoring helpers shared by data checks and the eval code (docs/world.md):
official-VQA-style answer normalisation and the (size, color, shape) triple F1 of captions."""

from __future__ import annotations

import re
from collections.abc import Iterable

from .world import COLORS, SHAPES, SIZES

# From the official VQA evaluation (vqaEval.py): punctuation, number words, articles, contractions.
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # the official regex strips every period not followed by a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't",
    "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "im": "i'm",
}


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(answer: str) -> str:
    """Normalise an answer the way the official VQA evaluation does before exact matching:
    lower-case, punctuation removed, number words → digits, articles dropped, contractions fixed."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for w in _punctuation(text).lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


_TRIPLE = re.compile(r"\b({})\s+({})\s+({})(?:e?s)?\b".format(
    "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES)))


def parse_triples(text: str) -> set[tuple[str, str, str]]:
    """All ``{size} {color} {shape}`` mentions in ``text`` as (size, color, shape)."""
    return {(m[1], m[2], m[3]) for m in _TRIPLE.finditer(text.lower())}


def _triple(obj) -> tuple[str, str, str]:
    if isinstance(obj, dict):
        return (obj["size"], obj["color"], obj["shape"])
    return (obj.size, obj.color, obj.shape)


def caption_triple_scores(text: str, objects: Iterable) -> dict[str, float]:
    """Precision, recall and F1 of the triples named in ``text`` against the scene's objects (dicts
    with size/color/shape, or ShapeObjects).  Repeated mentions count once."""
    pred, truth = parse_triples(text), {_triple(o) for o in objects}
    hit = len(pred & truth)
    p = hit / len(pred) if pred else float(not truth)
    r = hit / len(truth) if truth else float(not pred)
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def caption_triple_f1(text: str, objects: Iterable) -> float:
    return caption_triple_scores(text, objects)["f1"]
