"""ShapesWorld samples generated on the fly — no files needed, deterministic per (split, index, seed).

``ShapesWorldDataset`` is a plain map-style dataset (``__len__`` / ``__getitem__``), so a
``torch.utils.data.DataLoader`` accepts it as is, while this module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from .annotations import annotate, qa_pairs, text_corpus
from .world import Scene, make_scene, rng_for, scene_seed


def sample_key(split: str, index: int) -> str:
    """File/shard key of a scene (no dots: webdataset splits keys at the first dot)."""
    return f"{split}-{index:06d}"


@dataclass
class ShapesSample:
    key: str
    scene: Scene
    image: Image.Image
    annotation: dict  # see annotations.annotate: caption, description, qa, referring, conversation

    @property
    def caption(self) -> str:
        return self.annotation["caption"]

    @property
    def qa(self) -> list[dict]:
        return self.annotation["qa"]


def make_sample(split: str, index: int, base_seed: int = 0) -> ShapesSample:
    scene = make_scene(split, index, base_seed)
    return ShapesSample(sample_key(split, index), scene, scene.render(), annotate(scene))


def eval_questions(scene: Scene, per_type: int = 2) -> list[dict]:
    """The canonical questions the eval VQA file holds for a scene: up to ``per_type`` of each type
    (a fixed, seeded choice) so every type is represented without relations dominating."""
    return qa_pairs(scene, rng_for(scene.seed or 0, 6), per_type=per_type, include_describe=False)


def corpus_records(scene: Scene) -> list[dict]:
    return text_corpus(scene, rng_for(scene.seed or 0, 7))


class ShapesWorldDataset:
    """``dataset[i]`` → dict(key, image (PIL 64×64 RGB), caption, description, qa, conversation,
    scene (dict)).  ``transform`` (optional) is applied to the whole dict."""

    def __init__(self, split: str = "train", num: int = 10_000, seed: int = 0, transform=None):
        scene_seed(split, 0, seed)  # validates split and seed early
        self.split, self.num, self.seed, self.transform = split, num, seed, transform

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num:
            raise IndexError(index)
        s = make_sample(self.split, index, self.seed)
        item = {"key": s.key, "image": s.image, **s.annotation}
        return self.transform(item) if self.transform else item
