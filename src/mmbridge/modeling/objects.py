"""Object-centric queries: a DETR-style set loss on the Q-Former's query outputs.

Why: BLIP-2's stage-1 losses (ITC / ITM / ITG) let the queries summarise an image as a bag of
attributes. On scenes with several objects the shapes model then knew *which* colours and shapes were
present but not which colour went with which shape (docs/recipe.md, "the bridge loses binding"). DETR's
recipe fixes that at the source: every object in the image is matched one-to-one to a query (Hungarian
matching, scipy's `linear_sum_assignment`) and that query must predict all of the object's attributes and
its box, so each object's attributes end up *together* in one query — one soft-prompt vector per object,
the way the LM reads one word group per object in text.

Written here because no maintained library has it for a BLIP-2 Q-Former: transformers' DETR matcher and
loss are private to its DETR models and tied to their output classes. The attributes are named class
vocabularies from the model config (`qformer_object_attributes`, e.g. colour / shape / size), so any
dataset with per-object labels and boxes can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

#: DETR's weights: its matching cost weighs the L1 box distance 5x the class probability, and its
#: loss down-weights "no object" (here: objectness on unmatched queries) to 0.1.
BOX_COST, NO_OBJECT_WEIGHT = 5.0, 0.1


class QueryObjectHeads(nn.Module):
    """Per query: objectness, one classifier per attribute, and a box (cx, cy, w, h in [0, 1])."""

    def __init__(self, hidden_size: int, attributes: dict[str, Sequence[str]]):
        super().__init__()
        self.attributes = {name: list(values) for name, values in attributes.items()}
        self.objectness = nn.Linear(hidden_size, 1)
        self.classifiers = nn.ModuleDict({name: nn.Linear(hidden_size, len(values))
                                          for name, values in self.attributes.items()})
        self.box = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, 4))

    def forward(self, queries: torch.Tensor) -> dict[str, torch.Tensor]:
        """(images, queries, hidden) -> objectness logits (images, queries), attribute logits by name
        (images, queries, classes), boxes (images, queries, 4)."""
        return {"objectness": self.objectness(queries).squeeze(-1), "boxes": self.box(queries).sigmoid(),
                **{name: head(queries) for name, head in self.classifiers.items()}}

    def encode_targets(self, objects: Sequence[dict], device=None) -> dict[str, torch.Tensor]:
        """One image's objects (`{"box": [cx, cy, w, h] in [0, 1], "color": "red", ...}`) -> label tensors."""
        out = {"boxes": torch.tensor([o["box"] for o in objects], dtype=torch.float, device=device).reshape(-1, 4)}
        for name, values in self.attributes.items():
            try:
                out[name] = torch.tensor([values.index(o[name]) for o in objects], dtype=torch.long, device=device)
            except (KeyError, ValueError) as err:
                raise ValueError(f"object attribute {name!r}: {err}; every object needs one of {values}") from None
        return out

    @torch.no_grad()
    def match(self, predictions: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> tuple:
        """Hungarian matching for one image: (query indices, object indices) at least cost, where the cost
        of (query, object) is minus the probability of each of the object's attributes and of being an
        object, plus `BOX_COST` x the L1 box distance."""
        cost = BOX_COST * torch.cdist(predictions["boxes"].float(), targets["boxes"], p=1)
        cost = cost - predictions["objectness"].float().sigmoid()[:, None]
        for name in self.attributes:
            cost = cost - predictions[name].float().softmax(-1)[:, targets[name]]
        queries, objects = linear_sum_assignment(cost.cpu().numpy())
        return torch.as_tensor(queries, dtype=torch.long), torch.as_tensor(objects, dtype=torch.long)

    def loss(self, queries: torch.Tensor, objects: Sequence[Sequence[dict] | None]) -> torch.Tensor:
        """Set loss over the images that have object labels (`None` = unlabelled image, skipped):
        objectness BCE on every query (unmatched ones weighted `NO_OBJECT_WEIGHT`), cross-entropy of each
        attribute and L1 of the box on the matched queries, averaged over the labelled objects."""
        labelled = [i for i, o in enumerate(objects) if o is not None]
        if not labelled:
            raise ValueError("no image in this batch has object labels")
        predictions = self(queries[labelled])
        total_objects = max(sum(len(objects[i]) for i in labelled), 1)
        objectness, attribute, box = [], 0.0, 0.0
        for row, image in enumerate(labelled):
            mine = {k: v[row] for k, v in predictions.items()}
            target = self.encode_targets(objects[image], device=queries.device)
            if len(target["boxes"]) > len(mine["boxes"]):
                raise ValueError(f"{len(target['boxes'])} objects but only {len(mine['boxes'])} queries")
            rows, cols = self.match(mine, target)
            is_object = torch.zeros_like(mine["objectness"])
            is_object[rows] = 1.0
            weight = torch.full_like(is_object, NO_OBJECT_WEIGHT)
            weight[rows] = 1.0
            objectness.append(F.binary_cross_entropy_with_logits(mine["objectness"], is_object, weight=weight,
                                                                 reduction="sum") / weight.sum())
            for name in self.attributes:
                attribute = attribute + F.cross_entropy(mine[name][rows], target[name][cols], reduction="sum")
            box = box + F.l1_loss(mine["boxes"][rows], target["boxes"][cols], reduction="sum")
        return (torch.stack(objectness).mean() + attribute / total_objects
                + BOX_COST * box / (4 * total_objects))

    @torch.no_grad()
    def accuracy(self, queries: torch.Tensor, objects: Sequence[Sequence[dict]]) -> dict[str, float]:
        """How well the queries hold the objects: after matching, the fraction of objects whose query names
        every attribute right (`bound`: the attributes are held *together*), each attribute alone, and the
        fraction of images whose count of confident queries (objectness > 0.5) is right."""
        predictions = self(queries)
        right = {name: 0 for name in self.attributes}
        bound = counted = total = 0
        for row, image_objects in enumerate(objects):
            mine = {k: v[row] for k, v in predictions.items()}
            target = self.encode_targets(image_objects, device=queries.device)
            rows, cols = self.match(mine, target)
            every = torch.ones(len(rows), dtype=torch.bool)
            for name in self.attributes:
                hit = (mine[name][rows].argmax(-1) == target[name][cols]).cpu()
                right[name] += int(hit.sum())
                every &= hit
            bound += int(every.sum())
            total += len(image_objects)
            counted += int(int((mine["objectness"] > 0).sum()) == len(image_objects))
        return {"bound": bound / max(total, 1), **{n: r / max(total, 1) for n, r in right.items()},
                "count": counted / max(len(objects), 1), "objects": total}
