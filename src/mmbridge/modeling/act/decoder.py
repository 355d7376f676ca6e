"""A DETR-style box and mask decoder conditioned on the super-link queries' hidden states.

The memory is the frozen ViT's patch features — each with its 2-D sine position added, as DETR does
(without it a query can attend to "the red patches" but cannot read *where* they are) — the request's
super-link states, and the request's own words (the LLM's states of the tokens before the trigger, with a
learned position in that window): the "category text" of an open-vocabulary detector — what to find comes
from the user's words, not a class list. With the slots' states alone, a first full-size run picked the
asked-for object barely above chance (grounding 46 %, wrong objects sharing no attribute with the right one).

Queries are chosen as two-stage Deformable DETR / DINO choose them, because learned queries alone converge
far too slowly for a 30-minute CPU budget (DETR needs hundreds of epochs to tie queries to places): every
patch, read together with the request, is a *proposal* — a score "part of something asked for" and a box
relative to the patch — and the top-scoring `num_queries` proposals become the decoder's queries (their
features plus a learned per-rank embedding), each refining its proposal's box (a delta in logit space).
Scores are open-vocabulary detectors' (GLIP's fusion, OWL-ViT's dot product): each patch (and each query)
first attends to the request — slots and words — and its score is an objectness term plus the dot product
of its embedding with the request *as it read it*. "Is this what was asked" is a match between the two,
which an additive mix of a pooled request and the patch followed by a linear score cannot express; and a
pooled request drowns the one word that matters among template tokens.
The act head trains the proposals with the same matching losses as the final boxes. Each query predicts a
box (cx, cy, w, h in [0, 1]), one logit "is this what was asked for", and a mask as the dot product of its
embedding with per-patch embeddings (upsampled). Without an image, learned queries stand in.
The transformer is torch's; no maintained library ships this conditioning.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(hidden_size: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, out))


class LinkConditionedDecoder(nn.Module):
    def __init__(self, llm_hidden_size: int, vision_hidden_size: int, hidden_size: int, num_layers: int,
                 num_heads: int, num_queries: int, mask_size: int | None, request_window: int = 32,
                 text_hidden_size: int | None = None, pixel_decoder: bool = False,
                 attribute_groups: tuple[int, ...] | None = None, vocab_size: int | None = None,
                 pixel_stride: int = 2, pixel_channels: int = 64, box_refinement: bool = False,
                 pixel_features: bool = False):
        from transformers.models.detr.modeling_detr import DetrSinePositionEmbedding

        super().__init__()
        self.link_proj = nn.Linear(llm_hidden_size, hidden_size)
        self.vision_proj = nn.Linear(vision_hidden_size, hidden_size)
        self.request_proj = nn.Linear(llm_hidden_size, hidden_size)
        self.request_positions = nn.Parameter(torch.randn(1, request_window, hidden_size) * 0.02)
        if text_hidden_size is not None:  # the request's words as a frozen image-text tower reads them
            self.text_proj = nn.Linear(text_hidden_size, hidden_size)
        if text_hidden_size is not None and not attribute_groups:
            # selection (OWL-ViT / GLIP): each patch reads the tower's words alone and scores "asked for" as a
            # dot product; trained densely (`relevance`). In the shared fusion the same words sat among ~40 LLM
            # states and template tokens, and a first run scored every object alike whatever was asked
            self.select_text = nn.Linear(text_hidden_size, hidden_size)
            self.select_attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
            self.select_patch = nn.Linear(hidden_size, hidden_size)
            self.select_bias = nn.Linear(hidden_size, 1)
        if attribute_groups:
            self.attribute_selection = AttributeSelection(vision_hidden_size, hidden_size, num_heads,
                                                          tuple(attribute_groups), vocab_size)
        self.positions = DetrSinePositionEmbedding(num_position_features=hidden_size // 2, normalize=True)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        # GLIP-style fusion: each patch attends to the request (slots + words) before it proposes, so that
        # the one word that matters ("triangle") reaches the patch that has it; a mean over the request
        # window drowned it in template tokens (requests' pooled vectors at cosine 0.95, every request
        # answered with the same, most salient object)
        self.fusion = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.proposal_norm = nn.LayerNorm(hidden_size)
        self.proposal_score = nn.Linear(hidden_size, 1)  # objectness
        self.proposal_match = nn.Linear(hidden_size, hidden_size)  # the patch's side of the request match
        self.proposal_box = _mlp(hidden_size, 4)
        layer = nn.TransformerDecoderLayer(hidden_size, num_heads, 4 * hidden_size, dropout=0.0, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers)
        self.box_head = _mlp(hidden_size, 4)
        self.score_head = nn.Linear(hidden_size, 1)
        self.query_match = nn.Linear(hidden_size, hidden_size)
        if mask_size is not None or pixel_features:  # per-pixel features: masks, or the pose decoder's heatmaps
            if mask_size is not None:  # None: no mask branch (the pose decoder)
                self.mask_embed = nn.Linear(hidden_size, hidden_size)
            self.pixel_embed = nn.Linear(vision_hidden_size, hidden_size)
            if pixel_decoder:
                self.pixel_decoder = PixelDecoder(hidden_size, pixel_channels, pixel_stride)
            if box_refinement:
                if not pixel_decoder:
                    raise ValueError("act decoder: box refinement reads the pixel decoder's features: turn it on")
                # one more decoder layer, over the pixel decoder's fine features: a box read off 8-px patches is
                # off by a pixel or two, which costs IoU 0.75+ on 8-20 px objects (run d5: AP50 0.90, AP 0.62)
                self.refine = nn.TransformerDecoderLayer(hidden_size, num_heads, 4 * hidden_size, dropout=0.0,
                                                         batch_first=True)
                self.refine_box = _mlp(hidden_size, 4)
                nn.init.zeros_(self.refine_box[-1].weight)  # starts as the unrefined box
                nn.init.zeros_(self.refine_box[-1].bias)
        self.mask_size = mask_size

    def forward(self, link_hidden: torch.Tensor, vision_features: torch.Tensor | None,
                request_states: torch.Tensor | None = None,
                request_mask: torch.Tensor | None = None, text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, images: torch.Tensor | None = None,
                request_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(n, 1 + slots, llm_hidden), (n, tokens, vision_hidden) or None, and optionally the request's words
        (n, window, llm_hidden) with their (n, window) mask (True: a real token; the model's `head_context`
        makes both) and the same words read by the head's text tower, `text_states` (n, words, text_hidden)
        with `text_mask` (n, words); with a pixel decoder, each occurrence's image (n, 3, H, W) (any per-channel
        normalisation: the pixel decoder standardises it), and with an attribute selection the request's token
        ids, `request_ids` (n, window) -> per query: `boxes` (n, q, 4)
        cx cy w h, `logits` (n, q), `masks` (n, q, mask_size, mask_size) logits (None without an image or
        a mask branch), and `hidden` (n, q, hidden_size): each query's state, for task heads on top; with an
        image also every patch's proposal, `proposal_logits` (n, patches) and `proposal_boxes` (n, patches, 4),
        its `relevance` (n, patches), with an attribute selection `patch_attributes` (n, patches, values),
        and with per-pixel features (a mask branch or `pixel_features`) `pixels` (n, hidden_size, h, w)."""
        link = self.link_proj(link_hidden.to(self.link_proj.weight.dtype))
        summary = link.mean(dim=1, keepdim=True)  # (n, 1, d): the request pooled (the queries without an image)
        words, padding = link[:, :0], None
        if request_states is not None:
            window = request_states.shape[1]
            if window > self.request_positions.shape[1]:
                raise ValueError(f"act decoder: a request window of {window} tokens, built for at most "
                                 f"{self.request_positions.shape[1]}")
            words = self.request_proj(request_states.to(link.dtype)) + self.request_positions[:, -window:]
            mask = torch.ones(words.shape[:2], dtype=torch.bool, device=words.device) if request_mask is None \
                else request_mask.bool()
            weights = mask.to(words.dtype)[..., None]
            summary = summary + (words * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
            padding = torch.cat([torch.zeros_like(mask[:, :link.shape[1]]), ~mask], dim=1)  # True: not attended
        if text_states is not None:
            if padding is None:
                padding = torch.zeros(link.shape[:2], dtype=torch.bool, device=link.device)
            words = torch.cat([words, self.text_proj(text_states.to(link.dtype))], dim=1)
            padding = torch.cat([padding, ~text_mask.bool()], dim=1)
        text = torch.cat([link, words], dim=1)  # the request: slots, then words (`padding` covers these)
        patches = _patch_grid(vision_features)
        out = {"masks": None}
        memory, memory_padding = text, padding
        if patches is None:
            queries = self.queries.expand(link.shape[0], -1, -1) + summary
            reference = None
        else:
            n, tokens, _ = patches.shape
            side = math.isqrt(tokens)
            position = self.positions((n, 1, side, side), patches.device, link.dtype).flatten(2).transpose(1, 2)
            features = self.vision_proj(patches) + position
            memory = torch.cat([features, text], dim=1)
            if padding is not None:
                memory_padding = torch.cat([torch.zeros_like(padding[:, :1]).expand(-1, tokens), padding], dim=1)
            asked, _ = self.fusion(features, text, text, key_padding_mask=padding,
                                   need_weights=False)  # (n, patches, d): the request as each patch reads it
            proposals = self.proposal_norm(features + asked)  # each patch, read for this request
            match = (self.proposal_match(proposals) * asked).sum(-1) / math.sqrt(asked.shape[-1])
            # (n, patches): "this patch is part of something asked for" (trained densely: `relevance`)
            if hasattr(self, "attribute_selection"):
                if request_ids is None:
                    raise ValueError("this act decoder selects by the request's token ids: pass `request_ids`")
                out["relevance"], out["patch_attributes"] = self.attribute_selection(patches, request_ids,
                                                                                     request_mask)
            elif text_states is not None:
                out["relevance"] = self._select(features, text_states, text_mask)
            else:
                out["relevance"] = match
            out["proposal_logits"] = self.proposal_score(proposals).squeeze(-1) + match
            dense = text_states is not None or "patch_attributes" in out  # a selection branch of its own
            if dense:  # detached: only the dense loss trains it (the set losses call every
                # patch but one per object a negative, which would teach it the opposite)
                out["proposal_logits"] = out["proposal_logits"] + out["relevance"].detach()
            out["proposal_boxes"] = (_anchors(side, link) + self.proposal_box(proposals)).sigmoid()
            k = min(self.queries.shape[1], tokens)  # a grid smaller than the query count: every patch
            pick = out["proposal_logits"].topk(k, dim=1).indices[..., None]
            queries = proposals.gather(1, pick.expand(-1, -1, proposals.shape[-1])) + self.queries[:, :k]
            reference = out["proposal_boxes"].gather(1, pick.expand(-1, -1, 4)).detach()
        hidden = self.decoder(queries, memory, memory_key_padding_mask=memory_padding)
        boxes = self.box_head(hidden)  # in logit space
        if reference is not None:
            boxes = boxes + torch.logit(reference, eps=1e-4)
        asked, _ = self.fusion(hidden, text, text, key_padding_mask=padding,
                               need_weights=False)  # the request as each query reads it
        out.update(logits=self.score_head(hidden).squeeze(-1)
                   + (self.query_match(hidden) * asked).sum(-1) / math.sqrt(asked.shape[-1]))
        if patches is not None:  # each query also keeps its patch's relevance: the densely trained selection
            relevance = out["relevance"].detach() if dense else out["relevance"]
            out["logits"] = out["logits"] + relevance.gather(1, pick[..., 0])
        if patches is not None and hasattr(self, "pixel_embed"):
            pixels = self.pixel_embed(patches) + position  # (n, side*side, d): where, to tell alike objects apart
            pixels = pixels.transpose(1, 2).reshape(n, -1, side, side)
            if hasattr(self, "pixel_decoder"):  # the patch grid sharpened by the image itself
                if images is None:
                    raise ValueError("this act decoder predicts masks from the image's pixels: pass `images`")
                pixels = self.pixel_decoder(images.to(pixels.dtype), pixels)
            if hasattr(self, "refine"):  # each query reads the fine features where its object's edges are
                # pooled to 2 x 2 cells per patch (16 x 16 for 8 x 8 patches): each cell's features come from
                # convs over its pixels; attending to all 64 x 64 of them cost ~1.5 s more per CPU step
                grid = min(pixels.shape[-1], 2 * side)
                fine = F.adaptive_avg_pool2d(pixels, grid)
                fine = (fine + self.positions((n, 1, grid, grid), fine.device, fine.dtype)).flatten(2).transpose(1, 2)
                hidden = self.refine(hidden, fine)
                boxes = boxes + self.refine_box(hidden)
            out["pixels"] = pixels  # (n, d, h, w)
            if self.mask_size is not None:
                masks = torch.einsum("nqd,ndhw->nqhw", self.mask_embed(hidden), pixels)
                out["masks"] = F.interpolate(masks, size=(self.mask_size, self.mask_size), mode="bilinear",
                                             align_corners=False)
        out.update(boxes=boxes.sigmoid(), hidden=hidden)
        return out

    def _select(self, features: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        words = self.select_text(text_states.to(features.dtype))
        asked, _ = self.select_attention(features, words, words, key_padding_mask=~text_mask.bool(),
                                         need_weights=False)
        return ((self.select_patch(features) * asked).sum(-1) / math.sqrt(asked.shape[-1])
                + self.select_bias(features).squeeze(-1))


class AttributeSelection(nn.Module):
    """Which patches a request asks for, factored by attribute (colour, shape, size, … : `groups` gives each
    attribute's number of values). Each patch classifies its object's attributes (trained densely on the
    objects of the scene: `patch_attributes`, the `act_attributes` loss); one learned query per attribute
    reads the request's words (learned token embeddings: the foundation's tokenizer splits words it never saw
    in captions — "triangles", "every" — into pieces its text tower reads poorly) and says which values it
    allows, or any; the score is the sum over attributes of log P(the patch's value is allowed) — an AND
    over attributes, each an OR over values — plus objectness and a dot-product match of each patch with the
    words it reads (for relations). An isolated probe on frozen ShapesWorld patches
    (`scripts/act_selection_probe.py`, 2,000 requests) put its top patch in an asked-for object for 100 % of
    one- and two-attribute requests, 98 % of plain and 80 % of relational referring expressions, where the
    dot-product branch on the text tower's states reached 79 / 74 / 74 / 53 %. Written by hand: no library
    ships an attribute-factored open-vocabulary selection. With it, the decoder's text-tower selection branch
    is not built (the tower's words still reach the fusion)."""

    def __init__(self, vision_hidden_size: int, hidden_size: int, num_heads: int, groups: tuple[int, ...],
                 vocab_size: int):
        super().__init__()
        self.groups = groups
        # the frozen ViT's features normalised first, as OWL-ViT's class head does (any vision encoder's scale)
        self.patch_norm = nn.LayerNorm(vision_hidden_size)
        self.patch = nn.Sequential(nn.Linear(vision_hidden_size, hidden_size), nn.GELU(),
                                   nn.Linear(hidden_size, hidden_size))
        self.attributes = nn.Linear(hidden_size, sum(groups))
        self.objectness = nn.Linear(hidden_size, 1)
        self.words = nn.Embedding(vocab_size, hidden_size)
        self.queries = nn.Parameter(torch.randn(1, len(groups), hidden_size) * 0.02)
        self.read = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.allowed = nn.ModuleList(nn.Linear(hidden_size, k + 1) for k in groups)  # + "any value"
        # plus a dot-product scorer on the same words (each patch reads the request; OWL-ViT's match) for what
        # is no attribute: relations ("left of the blue square"). The probe: relational requests 52 -> 80 %
        self.attend_patch = nn.Linear(vision_hidden_size, hidden_size)
        self.attend = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.attend_match = nn.Linear(hidden_size, hidden_size)

    def forward(self, patches: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None):
        """(n, p, vision_hidden), (n, window) token ids, (n, window) True where real text -> the (n, p)
        relevance logits and the (n, p, sum(groups)) attribute logits."""
        known = ids < self.words.num_embeddings  # tokens added after this module (routes, <region>): not words
        mask = known if mask is None else mask.bool() & known
        empty = ~mask.any(1, keepdim=True)  # a row with no words reads its padding instead of nothing (NaN)
        words = self.words(ids.masked_fill(~known, 0))
        read, _ = self.read(self.queries.expand(len(ids), -1, -1), words, words, key_padding_mask=~(mask | empty),
                            need_weights=False)
        patches = self.patch_norm(patches.to(words.dtype))
        p = self.patch(patches)
        attributes = self.attributes(p)
        score = self.objectness(p).squeeze(-1)
        q = self.attend_patch(patches)
        asked, _ = self.attend(q, words, words, key_padding_mask=~(mask | empty), need_weights=False)
        score = score + (self.attend_match(q) * asked).sum(-1) / math.sqrt(q.shape[-1])
        for g, logits in enumerate(attributes.split(self.groups, dim=-1)):
            allowed = self.allowed[g](read[:, g]).softmax(-1)  # (n, values + any)
            fits = allowed[:, None, -1] + (logits.softmax(-1) * allowed[:, None, :-1]).sum(-1)
            score = score + fits.clamp(min=1e-6).log()
        return score, attributes


class PixelDecoder(nn.Module):
    """Mask features at 1 / `stride` of the image's resolution: a conv stem over the RGB image fused with the upsampled
    patch features (Mask2Former's pixel decoder in miniature). Masks as dot products with an 8 x 8 patch grid
    cannot follow the outline of an 8-20 px shape (a first full-size run: mask AP 0.05 at box AP 0.15, with
    no offset between mask and box). Each image is standardised per channel first, so the processor's
    normalisation (training) and plain [0, 1] pixels (decoding) read the same."""

    def __init__(self, hidden_size: int, channels: int = 64, stride: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, stride=stride, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.coarse = nn.Conv2d(hidden_size, channels, 1)
        self.fuse = nn.Sequential(nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(channels, hidden_size, 1))

    def forward(self, images: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W), (n, d, side, side) -> (n, d, H / stride, W / stride)."""
        mean = images.mean(dim=(2, 3), keepdim=True)
        std = images.std(dim=(2, 3), keepdim=True).clamp(min=1e-3)
        fine = self.stem((images - mean) / std)
        up = dict(size=fine.shape[-2:], mode="bilinear", align_corners=False)
        # the 1 x 1 conv before upsampling (both linear, so the same) reads the patch grid, not H x W copies of it
        return F.interpolate(patches, **up) + self.fuse(fine + F.interpolate(self.coarse(patches), **up))


def patch_centres(side: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y) centres of a side x side patch grid as fractions of the image, each (side, side)."""
    centres = (torch.arange(side, device=like.device, dtype=like.dtype) + 0.5) / side
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    return cx, cy


def _anchors(side: int, like: torch.Tensor) -> torch.Tensor:
    """Each patch's anchor box in logit space: its centre, two patches wide (the proposals' starting point)."""
    cx, cy = patch_centres(side, like)
    size = torch.full_like(cx, min(2.0 / side, 0.5))
    return torch.logit(torch.stack([cx, cy, size, size], dim=-1).view(1, side * side, 4), eps=1e-4)


def _patch_grid(vision_features: torch.Tensor | None) -> torch.Tensor | None:
    """The square grid of patch tokens (a leading CLS token, as ViT / CLIP have, is dropped)."""
    if vision_features is None:
        return None
    tokens = vision_features.shape[1]
    if math.isqrt(tokens) ** 2 == tokens:
        return vision_features
    if math.isqrt(tokens - 1) ** 2 == tokens - 1:
        return vision_features[:, 1:]
    raise ValueError(f"the act decoder needs a square grid of patch features, got {tokens} tokens")
