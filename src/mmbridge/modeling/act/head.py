"""The act head, perception routes: `[DET]` (every object the request names), `[SEG]` (the same with
masks) and `[GRD]` (the one object a referring expression names), each followed by its super-link
queries, through one link-conditioned DETR decoder that attends to the frozen ViT's patch features.

Training matches predictions to targets with the Hungarian algorithm (transformers' `HungarianMatcher`,
scipy underneath; costs as DETR: class 2, L1 5, GIoU 2) and reports `act_cls` (sigmoid focal),
`act_l1`, `act_giou` and, where targets carry masks, `act_mask` (focal) and `act_dice`.

Targets, one per routing token in reading order: `{"boxes": [[x0, y0, x1, y1], ...] in [0, 1] of the
image, "masks": optional list of (H, W) binary arrays or COCO RLE dicts}`; `[GRD]` takes exactly one box;
an empty `boxes` list (the category is not in the image) trains every query towards "nothing here".

`[POSE]` (`keypoints.py`) has its own decoder with a keypoint head, OKS matching and the losses
`act_cls`, `act_keypoints` (L1 on visible keypoints), `act_oks` (1 − OKS), `act_visibility` (BCE) and
`act_l1` / `act_giou` on the people's boxes. Its targets: `{"keypoints": per person K (x, y, v) triples
(flat, COCO-style, or nested) in [0, 1] of the image, v > 0 labelled, "boxes": [[x0, y0, x1, y1], ...]
(optional: the visible keypoints' extent; a person's box area is OKS's scale)}`.

`[GEN]` and `[EDIT]` draw through the draw head's generator (`ActConfig.draw_head`, found in `bind`):
`[GEN]`'s link states (trigger + 64 queries by default) go through the draw head's mapper into its UNet
exactly as the vokens do — one generator, two ways to ask — and report `act_gen` (the draw head's LDM
loss) and `act_gen_caption`; targets as the draw head's, `{"image", "caption"?}`. `[EDIT]` runs the
InstructPix2Pix editor (`editor.py`, component `editor`) and reports `act_edit` and, for targets with a
`caption` (the instruction, in the ShapesWorld data), `act_edit_caption`; targets `{"image": the edited image,
"source": the image to edit, "caption"?}` (images PIL / array / (3, H, W) tensor in [0, 1]); at inference
the source is the request's image (`context["images"]`); a request with none decodes `has_image` False.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers.loss.loss_for_object_detection import (
    HungarianMatcher,
    box_iou,
    center_to_corners_format,
    dice_loss,
    generalized_box_iou,
    sigmoid_focal_loss,
)

from mmbridge.heads_config import ActConfig, DrawConfig
from mmbridge.modeling.act.decoder import LinkConditionedDecoder, _patch_grid, patch_centres
from mmbridge.modeling.act.editor import InstructionEditor
from mmbridge.modeling.act.keypoints import PoseDecoder, keypoint_sigmas, match_people, oks
from mmbridge.modeling.act.region import QueryRegionReader, RegionEncoder
from mmbridge.modeling.draw.head import image_tensor
from mmbridge.modeling.heads import OutputHead, register_head

PERCEPTION_ROUTES = ("[DET]", "[SEG]", "[GRD]")
GENERATION_ROUTES = ("[GEN]", "[EDIT]")
DECODED_ROUTES = (*PERCEPTION_ROUTES, "[POSE]", *GENERATION_ROUTES)


def corners_to_center(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def duplicates(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """(n, q) True where a query's box overlaps a higher-scored one's at IoU >= `iou` (greedy NMS over a
    request's few queries; written here because torchvision is not a dependency). The queries start at the
    top patches, and two patches of one object can both keep it (run e2: 107 of 143 false positives on val
    at the serving threshold were a second box on an object already found)."""
    if not len(boxes):
        return torch.zeros_like(scores, dtype=torch.bool)
    return _suppressed(torch.stack([box_iou(row, row)[0] for row in boxes]), scores, iou)


def pose_duplicates(keypoints: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor, threshold: float,
                    sigmas: torch.Tensor) -> torch.Tensor:
    """(n, q) True where a query's person matches a higher-scored one's at OKS >= `threshold` (OKS-NMS, as pose
    evaluations run it; the kept person's box area is OKS's scale). (n, q, K, 2) keypoints, (n, q, 4) corner
    boxes. Several queries find the same figure (run g1: 7.7 people per one-figure image at score 0.05, their
    poses alike), and every copy is a false positive to COCOeval (keypoint AP 0.29; OKS-NMS at 0.9: 0.40)."""
    if not len(boxes):
        return torch.zeros_like(scores, dtype=torch.bool)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-6)
    every = torch.ones(keypoints.shape[1:3], device=keypoints.device)
    similarity = torch.stack([oks(kp, kp, every, a, sigmas) for kp, a in zip(keypoints, area)])  # [p, g]: g's scale
    return _suppressed(similarity.transpose(1, 2), scores, threshold)


def _suppressed(similarity: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy NMS: (n, q, q) similarity (`[k, j]`: of query j to the kept query k) -> (n, q) True where a query
    is at `threshold` or more like a higher-scored query that was itself kept."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    for row in range(len(scores)):
        for k in scores[row].argsort(descending=True).tolist():
            if not out[row, k]:
                later = similarity[row, k] >= threshold
                later[k] = False
                out[row] |= later & (scores[row] <= scores[row, k])
    return out


def mask_boxes(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The tight box (x0, y0, x1, y1 as fractions; pixel edges) of each (..., H, W) boolean mask of the whole
    image, and whether the mask marks any pixel (an empty one has no box)."""
    def extent(marked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = marked.shape[-1]
        index = torch.arange(size, device=marked.device)
        first = torch.where(marked, index, size).amin(-1)
        last = torch.where(marked, index, -1).amax(-1)
        return first.float() / size, (last + 1).float() / size

    x0, x1 = extent(masks.any(-2))
    y0, y1 = extent(masks.any(-1))
    return torch.stack([x0, y0, x1, y1], dim=-1), masks.flatten(-2).any(-1)


def crop_to_boxes(masks: torch.Tensor, boxes: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask R-CNN's rule, a mask lives inside its box, for masks of the whole image: each (..., H, W) boolean
    mask cut to its (..., 4) x0 y0 x1 y1 box (fractions) enlarged by `margin` of its size and one mask pixel,
    and each box tightened to what is left of its mask (kept as it was where nothing is). A mask read off
    the whole image spills onto a neighbouring object now and then (run e2: 5 % of the right boxes' masks at
    IoU < 0.5, each covering the next object too) where the regressed box does not; inside the box, the mask
    is pixel-exact where the regression is off by a pixel or two."""
    size = boxes[..., 2:] - boxes[..., :2]  # (w, h)
    pad = margin * torch.cat([size, size], dim=-1) + 1.0 / masks.shape[-1]
    x0, y0, x1, y1 = (boxes + torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device) * pad).unbind(-1)
    h, w = masks.shape[-2:]
    xs = (torch.arange(w, device=masks.device, dtype=boxes.dtype) + 0.5) / w
    ys = (torch.arange(h, device=masks.device, dtype=boxes.dtype) + 0.5) / h
    inside = (((xs >= x0[..., None]) & (xs <= x1[..., None]))[..., None, :]
              & ((ys >= y0[..., None]) & (ys <= y1[..., None]))[..., :, None])
    masks = masks & inside
    tight, found = mask_boxes(masks)
    return masks, torch.where(found[..., None], tight, boxes)


def _mask_tensor(mask, size: int) -> torch.Tensor:
    """A target mask (an (H, W) binary array, or COCO RLE `{"size": [H, W], "counts": ...}` as JSON data
    holds it) at the decoder's mask size."""
    if isinstance(mask, dict):
        mask = _decode_rle(mask)
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    return F.interpolate(mask[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0].round()


def _decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE: `counts` as a list of run lengths (uncompressed, column-major, starting with zeros) or
    pycocotools' compressed string."""
    height, width = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        from pycocotools import mask as mask_utils

        return mask_utils.decode({"size": [height, width], "counts": counts if isinstance(counts, bytes)
                                  else counts.encode()})
    values = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
    if values.size != height * width:
        raise ValueError(f"act: an RLE mask's runs cover {values.size} pixels, not {height} x {width}")
    return values.reshape(width, height).T


@register_head
class ActHead(OutputHead):
    kind = "act"
    config: ActConfig

    def __init__(self, config: ActConfig, model_config):
        super().__init__(config, model_config)
        unsupported = [t for t in config.routes if t not in DECODED_ROUTES]
        if unsupported:
            raise NotImplementedError(f"act routes {unsupported} have no decoder yet (decoded routes: "
                                      f"{list(DECODED_ROUTES)})")
        vision_hidden = model_config.vision_config.hidden_size
        if any(t in PERCEPTION_ROUTES for t in config.routes):
            self.text_encoder = None
            if config.text_encoder is not None:  # frozen: its weights come with the model (`add_act_head`)
                from transformers import AutoConfig, AutoModel

                settings = dict(config.text_encoder)
                self.text_encoder = AutoModel.from_config(AutoConfig.for_model(settings.pop("model_type"),
                                                                               **settings))
            if config.selection_attributes and config.selection_vocab_size is None:
                raise ValueError("act: selection_attributes needs selection_vocab_size (add_head fills it in)")
            self.decoders = LinkConditionedDecoder(
                self.llm_hidden_size, vision_hidden, config.decoder_hidden_size, config.decoder_layers,
                config.decoder_heads, config.num_object_queries, config.mask_size,
                text_hidden_size=None if self.text_encoder is None else self.text_encoder.config.hidden_size,
                pixel_decoder=config.mask_pixel_decoder, pixel_stride=config.mask_pixel_stride,
                pixel_channels=config.mask_pixel_channels,
                box_refinement=config.box_refinement,
                attribute_groups=tuple(len(v) for v in (config.selection_attributes or {}).values()) or None,
                vocab_size=config.selection_vocab_size)
        if "[POSE]" in config.routes:
            self.pose_decoder = PoseDecoder(
                self.llm_hidden_size, vision_hidden, config.decoder_hidden_size, config.decoder_layers,
                config.decoder_heads, config.num_object_queries, config.num_keypoints, heatmaps=config.pose_heatmaps,
                pixel_stride=config.mask_pixel_stride, pixel_channels=config.mask_pixel_channels)
        self.matcher = HungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
        if config.visual_prompts and config.region_from_queries:
            if not model_config.qformer_object_attributes:
                raise ValueError("act: region_from_queries reads the Q-Former query that holds the marked object, "
                                 "but this model's Q-Former has no object heads (qformer_object_attributes)")
            self.region_encoder = QueryRegionReader(self.llm_hidden_size)
        elif config.visual_prompts:
            self.region_encoder = RegionEncoder(self.llm_hidden_size, config.region_points, vision_hidden_size=
                                                vision_hidden if config.region_patch_features else None)
        self._draw = None  # the draw head ([GEN] / [EDIT]), a plain reference set in `bind`
        if any(t in GENERATION_ROUTES for t in config.routes):
            draw = model_config.head_configs.get(config.draw_head)
            if not isinstance(draw, DrawConfig):
                raise ValueError(f"act routes [GEN] / [EDIT] draw through a draw head named {config.draw_head!r} "
                                 "(ActConfig.draw_head), which this model lacks: add the draw head first")
            if "[EDIT]" in config.routes:
                path = (model_config.component_paths or {}).get(f"{draw.name}.generator") or draw.pipeline_path
                self.editor = InstructionEditor.from_generator_dir(
                    path, self.llm_hidden_size, draw.mapper_hidden_size, draw.mapper_layers, draw.mapper_heads,
                    draw.num_condition_queries, config.edit_source_residual)

    def bind(self, heads: dict) -> None:
        if any(t in GENERATION_ROUTES for t in self.config.routes):
            self.__dict__["_draw"] = heads.get(self.config.draw_head)  # not a submodule: its weights stay draw's

    def _draw_head(self):
        if self._draw is None:
            raise ValueError(f"act: [GEN] / [EDIT] need the draw head {self.config.draw_head!r}; "
                             "this head was not bound to it (build it inside an MMBridgeModel)")
        return self._draw

    @property
    def keypoint_sigmas(self) -> torch.Tensor:
        """OKS's per-keypoint sigmas (COCO's). Not a buffer: `from_pretrained` builds the model on the meta device and
        restores only saved tensors, so a non-persistent buffer came back as uninitialised memory — zeros at times,
        and OKS then divided by zero (NaN gradients from act stage 1's first step)."""
        return keypoint_sigmas(self.config.num_keypoints)

    @property
    def reads_patches(self) -> bool:
        """The region encoder pools the frozen ViT's patch features (`ActConfig.region_patch_features`)."""
        return hasattr(self.region_encoder, "patch_project")

    def encode_regions(self, pixel_values: torch.Tensor, masks: torch.Tensor,
                       vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """Visual prompts: (R, 3, H, W) images, (R, H, W) masks and, when the encoder reads them, each image's
        ViT features (R, tokens, vision_hidden) -> `<region>` embeddings (R, llm_hidden)."""
        patches = None if vision_features is None else _patch_grid(vision_features)
        return self.region_encoder(pixel_values, masks, patches)

    def loss(self, hidden: torch.Tensor, targets: list[dict], route: str, context: dict) -> dict[str, torch.Tensor]:
        if len(targets) != hidden.shape[0]:
            raise ValueError(f"act: {hidden.shape[0]} {route} in the batch but {len(targets)} targets")
        if route == "[POSE]":
            return self._pose_loss(hidden, targets, context)
        if route == "[GEN]":
            draw = self._draw_head()
            named = {"draw_ldm": "act_gen", "draw_caption": "act_gen_caption"}
            return {named[k]: v for k, v in draw.loss(hidden, targets, draw.config.trigger, context).items()}
        if route == "[EDIT]":
            return self._edit_losses(hidden, targets, context)
        out = self.decoders(hidden, *_decoder_inputs(context), *self._request_text(context),
                            images=_pixels(context), request_ids=context.get("request_ids"))
        device = out["boxes"].device
        boxes = [torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4) for t in targets]
        if route == "[GRD]" and any(len(b) != 1 for b in boxes):
            raise ValueError("act: a [GRD] target holds exactly one box")
        losses, indices, (rows, queries), num_boxes = self._set_losses(out["logits"], out["boxes"], boxes)
        losses = self._with_proposal_losses(losses, out, boxes)
        if "relevance" in out:
            losses["act_relevance"] = _relevance_loss(out["relevance"], boxes)
        if "patch_attributes" in out:
            losses["act_attributes"] = self._attribute_loss(out["patch_attributes"], targets)
        if out["masks"] is not None and all(t.get("masks") is not None for t in targets):
            if not len(rows):  # every request of the batch names nothing in its image: no mask to learn
                zero = out["masks"].sum() * 0.0
                losses["act_mask"], losses["act_dice"] = zero, zero.clone()
                return losses
            size = self.config.mask_size
            target_masks = torch.cat([torch.stack([_mask_tensor(targets[i]["masks"][j], size) for j in tgt.tolist()])
                                      for i, (_, tgt) in enumerate(indices) if len(tgt)]).to(device)
            predicted_masks = out["masks"][rows, queries].flatten(1)
            losses["act_mask"] = sigmoid_focal_loss(predicted_masks, target_masks.flatten(1), num_boxes)
            losses["act_dice"] = dice_loss(predicted_masks, target_masks.flatten(1), num_boxes)
        return losses

    def _attribute_loss(self, logits: torch.Tensor, targets: list[dict]) -> torch.Tensor:
        """Cross-entropy of every patch's attributes, per attribute, on the patches whose centre lies in exactly
        one of the scene's objects (`target["objects"]`: their boxes and attribute values; a target without
        it, or a value outside `selection_attributes`, teaches nothing)."""
        attributes = self.config.selection_attributes
        side = math.isqrt(logits.shape[1])
        cx, cy = (c.reshape(1, -1) for c in patch_centres(side, logits))
        labels = torch.full((*logits.shape[:2], len(attributes)), -1, dtype=torch.long, device=logits.device)
        for i, target in enumerate(targets):
            objects = target.get("objects")
            if not objects or not len(objects["boxes"]):
                continue
            b = torch.as_tensor(objects["boxes"], dtype=logits.dtype, device=logits.device).reshape(-1, 4)
            inside = _centres_inside(b, cx, cy)
            alone = inside.sum(0) == 1
            owner = inside.float().argmax(0)
            for g, (name, values) in enumerate(attributes.items()):
                index = torch.tensor([values.index(v) if v in values else -1 for v in objects.get(name, [])]
                                     or [-1] * len(b), device=logits.device)
                labels[i, :, g] = torch.where(alone, index[owner], -1)
        loss = logits.sum() * 0.0
        for g, group in enumerate(logits.split([len(v) for v in attributes.values()], dim=-1)):
            if (labels[..., g] >= 0).any():
                loss = loss + F.cross_entropy(group.flatten(0, 1), labels[..., g].flatten(), ignore_index=-1)
        return loss

    def _set_losses(self, logits: torch.Tensor, pred_boxes: torch.Tensor, boxes: list[torch.Tensor]):
        """DETR's set losses of (n, q) logits and (n, q, 4) cx cy w h boxes against per-row corner boxes:
        Hungarian matching, sigmoid focal on "asked for", L1 and GIoU on the matched boxes.
        -> (losses, matched (query, target) indices per row, their (rows, queries), number of target boxes)."""
        device = logits.device
        matching = [{"class_labels": torch.zeros(len(b), dtype=torch.long, device=device),
                     "boxes": corners_to_center(b)} for b in boxes]
        two_class = torch.stack([logits, torch.zeros_like(logits)], dim=-1)  # softmax[0] = sigmoid
        indices = self.matcher({"logits": two_class, "pred_boxes": pred_boxes}, matching)
        rows = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        queries = torch.cat([src for src, _ in indices])
        num_boxes = max(sum(len(b) for b in boxes), 1)
        wanted = torch.zeros_like(logits)
        wanted[rows, queries] = 1.0
        losses = {"act_cls": sigmoid_focal_loss(logits[..., None], wanted[..., None], num_boxes) * logits.shape[1]}
        predicted = pred_boxes[rows, queries]
        target = torch.cat([matching[i]["boxes"][tgt] for i, (_, tgt) in enumerate(indices)])
        losses["act_l1"] = F.l1_loss(predicted, target, reduction="sum") / num_boxes
        giou = torch.diag(generalized_box_iou(center_to_corners_format(predicted), center_to_corners_format(target)))
        losses["act_giou"] = (1 - giou).sum() / num_boxes
        return losses, indices, (rows, queries), num_boxes

    def _with_proposal_losses(self, losses: dict, out: dict, boxes: list[torch.Tensor]) -> dict:
        """The decoder's patch proposals (its queries' starting points) learn by the same set losses, added
        under the same names (two-stage Deformable DETR's encoder loss)."""
        if "proposal_logits" not in out:
            return losses
        extra = self._set_losses(out["proposal_logits"], out["proposal_boxes"], boxes)[0]
        return {k: v + extra[k] if k in extra else v for k, v in losses.items()}

    @torch.no_grad()
    def decode(self, hidden: torch.Tensor, route: str, context: dict) -> dict[str, torch.Tensor]:
        """Per occurrence: every query's box (x0, y0, x1, y1 in [0, 1]), score, mask, and which to keep
        (above `score_threshold`; for `[GRD]` the single best). `[POSE]`: also every query's `keypoints`
        (K, 2) x y in [0, 1] and `keypoint_scores` (K,) visibility probabilities. `[GEN]`: the drawn
        `image` (3, H, W) in [0, 1]; `[EDIT]`: the edited `image` and `has_image` (False: nothing to edit)."""
        if route == "[GEN]":
            draw = self._draw_head()
            return draw.decode(hidden, draw.config.trigger, context)
        if route == "[EDIT]":
            return self._edit_decode(hidden, context)
        if route == "[POSE]":
            out = self.pose_decoder(hidden, *_decoder_inputs(context), images=_pixels(context))
            scores = out["logits"].sigmoid()
            keypoints, boxes = out["keypoints"].clamp(0, 1), center_to_corners_format(out["boxes"]).clamp(0, 1)
            keep = scores > self.config.score_threshold
            if self.config.duplicate_oks is not None:
                keep = keep & ~pose_duplicates(keypoints, boxes, scores, self.config.duplicate_oks,
                                               self.keypoint_sigmas)
            return {"keypoints": keypoints, "keypoint_scores": out["visibility"].sigmoid(), "boxes": boxes,
                    "scores": scores, "keep": keep, **_has_image(context, hidden)}
        out = self.decoders(hidden, *_decoder_inputs(context), *self._request_text(context),
                            images=_pixels(context), request_ids=context.get("request_ids"))
        scores = out["logits"].sigmoid()
        if route == "[GRD]":
            keep = F.one_hot(scores.argmax(-1), scores.shape[-1]).bool()
        else:
            keep = scores > self.config.score_threshold
        boxes = center_to_corners_format(out["boxes"]).clamp(0, 1)
        masks = None if out["masks"] is None else out["masks"].sigmoid() > 0.5
        if masks is not None and self.config.masks_in_boxes:
            masks, boxes = crop_to_boxes(masks, boxes, self.config.mask_box_margin)
        if route != "[GRD]" and self.config.duplicate_iou is not None:
            keep = keep & ~duplicates(boxes, scores, self.config.duplicate_iou)
        decoded = {"boxes": boxes, "scores": scores, "keep": keep, **_has_image(context, hidden)}
        if masks is not None and route != "[DET]":
            decoded["masks"] = masks
        return decoded

    @torch.no_grad()
    def _request_text(self, context: dict) -> tuple:
        """The request's words read by the frozen text tower (`ActConfig.text_encoder`: the foundation's CLIP
        text tower, trained against the ViT, so "triangle" is already what a triangle's patches look like):
        the window's real tokens moved to the front, as the tower saw captions -> (states, mask) or ()."""
        ids, mask = context.get("request_ids"), context.get("request_mask")
        if self.text_encoder is None or ids is None:
            return ()
        settings = self.text_encoder.config
        keep = mask.bool() & (ids < settings.vocab_size)  # tokens added later (routes, <region>) it never saw
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices
        keep = keep.gather(1, order)
        ids = torch.where(keep, ids.gather(1, order), torch.full_like(ids, settings.pad_token_id))
        states = self.text_encoder(input_ids=ids, attention_mask=keep.long()).last_hidden_state
        return states, keep

    def _edit_losses(self, hidden: torch.Tensor, targets: list[dict], context: dict) -> dict[str, torch.Tensor]:
        generator = self._draw_head().generator
        size = generator.image_size
        images = context.get("images")
        sources = []
        for i, target in enumerate(targets):
            if target.get("source") is not None:
                sources.append(image_tensor(target["source"], size))
            elif images is not None and bool(context["has_image"][i]):
                sources.append(image_tensor(images[i], size))
            else:
                raise ValueError("act: an [EDIT] target needs its 'source' image (the image to edit)")
        edited = torch.stack([image_tensor(t["image"], size) for t in targets]).to(hidden.device)
        losses = {"act_edit": self.editor.loss(generator, hidden, torch.stack(sources).to(hidden.device), edited,
                                               self.config.edit_condition_dropout)}
        captioned = [i for i, t in enumerate(targets) if t.get("caption")]
        if captioned:
            caption = self.editor.caption_loss(generator, hidden[captioned], [targets[i]["caption"] for i in captioned])
            if caption is not None:
                losses["act_edit_caption"] = caption
        return losses

    @torch.no_grad()
    def _edit_decode(self, hidden: torch.Tensor, context: dict) -> dict[str, torch.Tensor]:
        draw = self._draw_head()
        size = draw.generator.image_size
        has_image = context.get("has_image")
        if has_image is None or context.get("images") is None:
            has_image = torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        out = torch.zeros(hidden.shape[0], 3, size, size, device=hidden.device)
        if has_image.any():
            sources = torch.stack([image_tensor(image, size) for image in context["images"][has_image]])
            rng = torch.Generator().manual_seed(draw.config.sample_seed)
            steps = self.config.edit_num_inference_steps or draw.config.num_inference_steps
            out[has_image] = self.editor.sample(draw.generator, hidden[has_image], sources,
                                                self.config.edit_guidance_scale,
                                                self.config.edit_image_guidance_scale, steps, rng).to(out.dtype)
        return {"image": out, "has_image": has_image}

    def _pose_loss(self, hidden: torch.Tensor, targets: list[dict], context: dict) -> dict[str, torch.Tensor]:
        out = self.pose_decoder(hidden, *_decoder_inputs(context), images=_pixels(context))
        device, k = out["keypoints"].device, self.config.num_keypoints
        people = [_pose_target(t, k, device) for t in targets]
        indices = [match_people(out["keypoints"][i], out["logits"][i], p["keypoints"], p["visible"], p["area"],
                                self.keypoint_sigmas) for i, p in enumerate(people)]
        rows = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        queries = torch.cat([src for src, _ in indices])
        num_people = max(sum(len(p["area"]) for p in people), 1)
        wanted = torch.zeros_like(out["logits"])
        wanted[rows, queries] = 1.0
        losses = {"act_cls": sigmoid_focal_loss(out["logits"][..., None], wanted[..., None], num_people)
                  * out["logits"].shape[1]}
        matched = {key: torch.cat([p[key][tgt] for p, (_, tgt) in zip(people, indices)])
                   for key in ("keypoints", "visible", "area", "boxes")}
        predicted = out["keypoints"][rows, queries]  # (people, K, 2)
        truth, visible = matched["keypoints"], matched["visible"]
        losses["act_keypoints"] = ((predicted - truth).abs().sum(-1) * visible).sum() / visible.sum().clamp(min=1)
        similarity = torch.diagonal(oks(predicted, truth, visible, matched["area"], self.keypoint_sigmas))
        losses["act_oks"] = (1 - similarity).sum() / num_people
        losses["act_visibility"] = F.binary_cross_entropy_with_logits(out["visibility"][rows, queries], visible,
                                                                      reduction="sum") / (num_people * k)
        boxes = out["boxes"][rows, queries]
        target_boxes = corners_to_center(matched["boxes"])
        losses["act_l1"] = F.l1_loss(boxes, target_boxes, reduction="sum") / num_people
        giou = torch.diag(generalized_box_iou(center_to_corners_format(boxes), matched["boxes"]))
        losses["act_giou"] = (1 - giou).sum() / num_people
        return self._with_proposal_losses(losses, out, [p["boxes"] for p in people])


def _has_image(context: dict, hidden: torch.Tensor) -> dict:
    """Which rows had an image to look at (the model's context says; a decode without it assumes all did): a
    perception route of a row without one is answered in words, not with boxes found in zeros."""
    has_image = context.get("has_image")
    return {"has_image": torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
            if has_image is None else has_image}


def _decoder_inputs(context: dict) -> tuple:
    """What the perception decoders read from the model's head context: patches and the request's words."""
    return context.get("vision_features"), context.get("request_states"), context.get("request_mask")


def _relevance_loss(relevance: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
    """Dense selection: every patch whose centre lies in an asked-for box is positive, every other patch
    negative (binary cross-entropy, per patch). The set losses tell one matched patch per object from the rest,
    so "a red circle's patch when red circles were asked" was learnt from one patch an object; a
    first full-size run found everything (class-agnostic AP50 0.98) but picked the asked class poorly."""
    cx, cy = (c.reshape(1, -1) for c in patch_centres(int(relevance.shape[1] ** 0.5), relevance))
    target = torch.zeros_like(relevance)
    for i, b in enumerate(boxes):
        if len(b):
            target[i] = _centres_inside(b.to(relevance.dtype), cx, cy).any(0).to(relevance.dtype)
    return F.binary_cross_entropy_with_logits(relevance, target)


def _centres_inside(boxes: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """(boxes, patches): whether each patch centre (cx, cy: (1, patches)) lies in each x0 y0 x1 y1 box."""
    return (cx >= boxes[:, :1]) & (cx <= boxes[:, 2:3]) & (cy >= boxes[:, 1:2]) & (cy <= boxes[:, 3:4])


def _pixels(context: dict) -> torch.Tensor | None:
    """Each occurrence's image for the pixel decoder: the processor's `pixel_values` (training) or the images
    in [0, 1] (decoding); the decoder standardises either."""
    pixels = context.get("pixel_values")
    return context.get("images") if pixels is None else pixels


def _pose_target(target: dict, num_keypoints: int, device) -> dict[str, torch.Tensor]:
    """One `[POSE]` target -> (G, K, 2) keypoints, (G, K) visibility in {0, 1}, (G, 4) corner boxes, (G,) areas."""
    if "keypoints" not in target:
        raise ValueError("act: a [POSE] target needs 'keypoints' (per person K (x, y, v) triples in [0, 1])")
    raw = torch.as_tensor(np.asarray(target["keypoints"], dtype=np.float32), device=device)
    if raw.numel() % (3 * num_keypoints):
        raise ValueError(f"act: [POSE] keypoints hold {raw.numel()} numbers, not people of {num_keypoints} "
                         f"(x, y, v) triples")
    raw = raw.reshape(-1, num_keypoints, 3)
    keypoints, visible = raw[..., :2], (raw[..., 2] > 0).float()
    if raw.numel() and (keypoints * visible[..., None]).abs().max() > 1.5:
        raise ValueError("act: [POSE] keypoints are fractions of the image in [0, 1], not pixels")
    if target.get("boxes") is not None:
        boxes = torch.as_tensor(np.asarray(target["boxes"], dtype=np.float32), device=device).reshape(-1, 4)
        if len(boxes) != len(raw):
            raise ValueError(f"act: a [POSE] target has {len(raw)} people but {len(boxes)} boxes")
    else:  # the visible keypoints' extent
        far = torch.where(visible[..., None] > 0, keypoints, torch.full_like(keypoints, float("nan")))
        boxes = torch.cat([far.nan_to_num(2.0).amin(1), far.nan_to_num(-1.0).amax(1)], dim=-1).clamp(0, 1)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-4)
    return {"keypoints": keypoints, "visible": visible, "boxes": boxes, "area": area}
