"""The Q-Former: N learned queries that cross-attend to image features (BLIP-2).

A see-model only needs the queries' output. BLIP-2's stage 1 also runs *text* through the same
transformer (`Blip2QFormerModel` shares self-attention between queries and text and has separate
feed-forwards for each), with one attention mask per objective (BLIP-2 Fig. 2):

* ITC — unimodal: queries see only queries, text sees only text (two separate passes).
* ITM — bi-directional: queries and text all see each other.
* ITG — multimodal causal: queries see queries; text sees all queries and earlier text.

transformers ships the shared transformer but no ITG head and no mask builder for these three
cases, so the text side below is written here; `build_qformer_text_mask` is the one hand-made piece.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from mmbridge.config import MMBridgeConfig
from mmbridge.modeling.objects import QueryObjectHeads
from mmbridge.tokenization import tokenize_qformer_text  # noqa: F401  (re-exported for stage-1 code)

MASK_MODES = ("bidirectional", "causal")


def build_qformer_text_mask(num_queries: int, text_attention_mask: torch.Tensor, mode: str,
                            dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask (batch, 1, queries + text, queries + text) for queries followed by text.

    `bidirectional` (ITM): every position sees every non-padding position.
    `causal` (ITG): queries see only queries; text token t sees all queries and text tokens <= t.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mode must be one of {MASK_MODES}, got {mode!r}")
    batch, text_len = text_attention_mask.shape
    total = num_queries + text_len
    device = text_attention_mask.device
    keys = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=device),
                      text_attention_mask.bool()], dim=1)
    allowed = keys[:, None, :].expand(batch, total, total).clone()
    if mode == "causal":
        allowed[:, :num_queries, num_queries:] = False
        causal = torch.ones(text_len, text_len, dtype=torch.bool, device=device).tril()
        allowed[:, num_queries:, num_queries:] &= causal
    mask = torch.zeros(batch, 1, total, total, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


class QFormerTextHeads(nn.Module):
    """BLIP-2 stage-1 heads: text embeddings, ITC projections and temperature, ITM and ITG heads."""

    def __init__(self, config: MMBridgeConfig):
        super().__init__()
        qformer_config = config.qformer_config
        hidden = qformer_config.hidden_size
        self.embeddings = Blip2TextEmbeddings(qformer_config)
        self.vision_projection = nn.Linear(hidden, config.image_text_hidden_size)
        self.text_projection = nn.Linear(hidden, config.image_text_hidden_size)
        self.itm_head = nn.Linear(hidden, 2)
        # BERT's LM prediction head (transform + decoder), untied so safetensors holds no shared tensors.
        self.lm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                          nn.LayerNorm(hidden, eps=qformer_config.layer_norm_eps))
        self.lm_head = nn.Linear(hidden, qformer_config.vocab_size)
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())  # BLIP-2's temp = 0.07


class QFormer(nn.Module):
    """transformers' `Blip2QFormerModel` plus its learned query tokens (and, optionally, the text side).

    The query tokens live here (not on the composed model) so that the whole Q-Former — queries
    included — is one component for freezing, saving and importing.
    """

    def __init__(self, config: MMBridgeConfig):
        super().__init__()
        qformer_config = config.qformer_config
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
        self.model = Blip2QFormerModel(qformer_config)
        self.text = QFormerTextHeads(config) if config.image_text_hidden_size else None
        attributes = config.qformer_object_attributes
        self.objects = QueryObjectHeads(qformer_config.hidden_size, attributes) if attributes else None

    @property
    def hidden_size(self) -> int:
        return self.query_tokens.shape[-1]

    @property
    def num_queries(self) -> int:
        return self.query_tokens.shape[1]

    def forward(self, image_features: torch.Tensor, image_attention_mask: torch.Tensor | None = None,
                instruction_ids: torch.Tensor | None = None,
                instruction_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(num_images, num_patches, vision_hidden) -> (num_images, num_queries, qformer_hidden).

        With `instruction_ids` (one row per image: CLS + the instruction's tokens), the queries also
        attend to the instruction — InstructBLIP's instruction-aware Q-Former (bi-directional mask)."""
        if instruction_ids is None:
            return self._run(self._queries(image_features.shape[0]), image_features, image_attention_mask)
        if instruction_mask is None:
            instruction_mask = torch.ones_like(instruction_ids)
        embeds = self._embed_text(instruction_ids, True)
        mask = build_qformer_text_mask(self.num_queries, instruction_mask, "bidirectional", embeds.dtype)
        hidden = self._run(embeds, image_features, image_attention_mask, attention_mask=mask,
                           query_length=self.num_queries)
        return hidden[:, :self.num_queries]

    # -- text side (stage 1 and retrieval) ------------------------------------------------------
    def _queries(self, batch: int) -> torch.Tensor:
        return self.query_tokens.expand(batch, -1, -1)

    def _run(self, embeds: torch.Tensor, image_features: torch.Tensor | None, image_attention_mask=None,
             attention_mask: torch.Tensor | None = None, query_length: int | None = None) -> torch.Tensor:
        kwargs = {}
        if image_features is not None:
            if image_attention_mask is None:
                image_attention_mask = torch.ones(image_features.shape[:-1], dtype=torch.long,
                                                  device=image_features.device)
            kwargs = {"encoder_hidden_states": image_features, "encoder_attention_mask": image_attention_mask}
        return self.model(query_embeds=embeds, attention_mask=attention_mask, query_length=query_length,
                          return_dict=True, **kwargs).last_hidden_state

    def _embed_text(self, input_ids: torch.Tensor, with_queries: bool) -> torch.Tensor:
        # Positions are passed explicitly: the embeddings' `position_ids` buffer is not saved, and a
        # meta-device load leaves it uninitialised.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        queries = self._queries(input_ids.shape[0]) if with_queries else None
        return self._require_text().embeddings(input_ids=input_ids, position_ids=positions, query_embeds=queries)

    def _require_text(self) -> QFormerTextHeads:
        if self.text is None:
            raise ValueError("this Q-Former has no text side; set `image_text_hidden_size` in the model config")
        return self.text

    def image_embeds(self, image_features: torch.Tensor) -> torch.Tensor:
        """ITC image side: L2-normalised projected query outputs (images, queries, itc_dim)."""
        text = self._require_text()
        return F.normalize(text.vision_projection(self(image_features)), dim=-1)

    def text_embeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """ITC text side: the CLS output of text alone (unimodal mask), projected and normalised."""
        text = self._require_text()
        hidden = self._run(self._embed_text(input_ids, False), None, attention_mask=attention_mask, query_length=0)
        return F.normalize(text.text_projection(hidden[:, 0]), dim=-1)

    def similarity(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(images, texts) ITC similarity: the best-matching query per pair, as BLIP-2."""
        return torch.einsum("iqd,td->itq", image_embeds, text_embeds).amax(dim=-1)

    def itm_logits(self, image_features: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits (batch, 2), averaged over the queries' outputs (bi-directional mask)."""
        text = self._require_text()
        embeds = self._embed_text(input_ids, True)
        mask = build_qformer_text_mask(self.num_queries, attention_mask, "bidirectional", embeds.dtype)
        hidden = self._run(embeds, image_features, attention_mask=mask, query_length=self.num_queries)
        return text.itm_head(hidden[:, :self.num_queries]).mean(dim=1)

    def itg_logits(self, image_features: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the text (batch, text_len, vocab) under the multimodal-causal mask.

        The queries are the only path from the image to the text, so they must hold what the text needs."""
        text = self._require_text()
        embeds = self._embed_text(input_ids, True)
        mask = build_qformer_text_mask(self.num_queries, attention_mask, "causal", embeds.dtype)
        hidden = self._run(embeds, image_features, attention_mask=mask, query_length=self.num_queries)
        return text.lm_head(text.lm_transform(hidden[:, self.num_queries:]))

    # -- BLIP-2 stage 1 ------------------------------------------------------------------------
    def stage1_losses(self, image_features: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, *,
                      cls_token_id: int, dec_token_id: int, losses: Sequence[str] = ("itc", "itm", "itg"),
                      label_smoothing: float = 0.1) -> dict[str, torch.Tensor]:
        """ITC / ITM / ITG for (image i, text i) pairs, following LAVIS' `Blip2Qformer.forward`.

        `text_ids` are CLS + text + EOS (right-padded, one row per image); ITG reads the same text after
        BLIP-2's DEC token. ITC takes the best-matching query per pair with in-batch negatives and a learned
        temperature; ITM scores one positive and two hard negatives per sample drawn from the ITC
        similarity softmax (torch's global RNG, so a resumed run draws the same), logits averaged over the
        queries; ITG generates the text from the queries under the multimodal-causal mask (label smoothing
        0.1 as BLIP-2). One deviation, for a world with few distinct captions: in-batch pairs whose texts are
        identical are both positives (soft ITC targets, never drawn as ITM negatives)."""
        out: dict[str, torch.Tensor] = {}
        batch = image_features.shape[0]
        ids = text_ids.clone()
        ids[:, 0] = cls_token_id
        both_pad = (text_mask[:, None, :] == 0) & (text_mask[None, :, :] == 0)
        same_text = ((ids[:, None, :] == ids[None, :, :]) | both_pad).all(-1)
        if "itc" in losses or "itm" in losses:
            image_embeds = self.image_embeds(image_features)
            text_embeds = self.text_embeds(ids, text_mask)
            scale = self._require_text().logit_scale.exp().clamp(max=100.0)
            sim_i2t = self.similarity(image_embeds, text_embeds) * scale  # (images, texts)
            sim_t2i = sim_i2t.t()
            if "itc" in losses:
                targets = same_text.float() / same_text.float().sum(dim=1, keepdim=True)
                out["itc"] = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2
        if "itm" in losses:
            with torch.no_grad():  # hard negatives: likely-but-wrong partners (never a same-text pair)
                weights_t2i = F.softmax(sim_t2i.float(), dim=1).masked_fill(same_text, 0) + 1e-9
                weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(same_text, 0) + 1e-9
                has_negative = ~same_text.all(dim=1)
                neg_image = torch.multinomial(weights_t2i, 1).squeeze(1)
                neg_text = torch.multinomial(weights_i2t, 1).squeeze(1)
            keep = has_negative.nonzero().squeeze(1)
            itm_images = torch.cat([image_features, image_features[neg_image[keep]], image_features[keep]])
            itm_ids = torch.cat([ids, ids[keep], ids[neg_text[keep]]])
            itm_mask = torch.cat([text_mask, text_mask[keep], text_mask[neg_text[keep]]])
            labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * len(keep), dtype=torch.long)])
            logits = self.itm_logits(itm_images, itm_ids, itm_mask)
            out["itm"] = F.cross_entropy(logits, labels.to(logits.device))
        if "itg" in losses:
            gen_ids = ids.clone()
            gen_ids[:, 0] = dec_token_id
            logits = self.itg_logits(image_features, gen_ids, text_mask)
            targets = gen_ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
            out["itg"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         ignore_index=-100, label_smoothing=label_smoothing)
        return out
