"""ShapesWorld: the embedded default world (docs/world.md) — scenes, renderer, annotations, oracle."""

from .annotations import (
    QSpec,
    annotate,
    answer,
    answer_question,
    conversation,
    description,
    parse_question,
    qa_pairs,
    referring_expressions,
    short_caption,
    text_corpus,
)
from .dataset import ShapesSample, ShapesWorldDataset, make_sample, sample_key
from .metrics import caption_triple_f1, caption_triple_scores, normalize_answer, vqa_match
from .oracle import analyse, compare, read_scene
from .world import (
    COLORS,
    SHAPES,
    SIZES,
    WORLD_VERSION,
    Scene,
    ShapeObject,
    make_scene,
    render,
    sample_scene,
    scene_seed,
    spec_violations,
)

__all__ = [
    "COLORS", "SHAPES", "SIZES", "WORLD_VERSION", "QSpec", "Scene", "ShapeObject", "ShapesSample",
    "ShapesWorldDataset", "analyse", "annotate", "answer", "answer_question", "caption_triple_f1",
    "caption_triple_scores", "compare", "conversation", "description", "make_sample", "make_scene",
    "normalize_answer", "parse_question", "qa_pairs", "read_scene", "referring_expressions", "render",
    "sample_key", "sample_scene", "scene_seed", "short_caption", "spec_violations", "text_corpus",
    "vqa_match",
]
