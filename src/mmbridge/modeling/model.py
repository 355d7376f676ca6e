"""`MMBridgeModel`: frozen vision encoder -> Q-Former -> projection -> soft prompt in a frozen causal LM.

The processor expands every image placeholder into `num_query_tokens` copies of the image token;
`embed_inputs` scatters the projected Q-Former outputs into exactly those positions. Images therefore
sit anywhere in a conversation, several per sample, and left padding for batches needs no special
care. Components are attributes named like the config's `COMPONENTS` (vision, qformer, projection,
llm), which is what freezing, trainable-only checkpoints and importers key on.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from mmbridge.config import IMAGE_LOSSES, LM_FIRST_LOSS, LM_TURN_LOSS, OBJECT_LOSS, QFORMER_LOSSES, MMBridgeConfig
from mmbridge.modeling.bridge import build_projection, embedding_rms
from mmbridge.modeling.components import load_component
from mmbridge.modeling.heads import REQUEST_WINDOW, OutputHead, build_head, slot_positions
from mmbridge.modeling.llm import LanguageModel, merge_adapters_
from mmbridge.modeling.loading import load_streaming, needs_conversion, safetensors_files
from mmbridge.modeling.outputs import MMBridgeOutput
from mmbridge.modeling.qformer import QFormer, QFormerTextHeads
from mmbridge.modeling.quantize import GROUP_SIZES, QUANTIZE_CHOICES, has_int8, quantize_int8_
from mmbridge.modeling.vision import VisionEncoder

TRAINABLE_WEIGHTS_NAME = "trainable.safetensors"


def is_llm_adapter(param_name: str) -> bool:
    """Parameters that peft adds to the frozen LLM: added-token rows and LoRA matrices."""
    return "trainable_tokens_delta" in param_name or ".lora_" in param_name


class MMBridgeModel(PreTrainedModel):
    config_class = MMBridgeConfig
    config: MMBridgeConfig
    base_model_prefix = "mmbridge"
    main_input_name = "input_ids"
    _no_split_modules = []
    _supports_sdpa = True

    def __init__(self, config: MMBridgeConfig, vision_model: PreTrainedModel | None = None,
                 language_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.vision = VisionEncoder(config, vision_model)
        self.qformer = QFormer(config)
        self.projection = build_projection(config)
        self.llm = LanguageModel(config, language_model)
        # Output heads are top-level modules named like the head, so their components are module paths
        # ("count", "draw.mapper") like the base four.
        self.head_names = []
        for name, head_config in config.head_configs.items():
            if hasattr(self, name):
                raise ValueError(f"head name {name!r} is taken by an attribute of the model")
            self.add_module(name, build_head(head_config, config))
            self.head_names.append(name)
        self._bind_heads()
        self.post_init()
        if config.projection_norm:
            self._match_llm_embedding_scale()
        self.apply_trainable_policy()

    def _match_llm_embedding_scale(self) -> None:
        """`projection_norm`: scale soft prompts to the LLM's token-embedding RMS, measured now unless the
        config already holds it (a saved model keeps the scale it was composed with)."""
        if self.config.projection_norm_scale is None:
            weight = self.get_input_embeddings().weight
            if weight.is_meta:
                raise ValueError("projection_norm needs projection_norm_scale, or an LLM with weights to "
                                 "measure it from")
            self.config.projection_norm_scale = embedding_rms(weight)
        self.projection.scale = float(self.config.projection_norm_scale)

    def get_input_embeddings(self) -> nn.Module:
        """The LLM's token embeddings (what transformers and accelerate's FSDP ask a model for)."""
        return self.llm.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.model.set_input_embeddings(value)

    @property
    def heads(self) -> dict[str, OutputHead]:
        return {name: getattr(self, name) for name in self.head_names}

    def _bind_heads(self) -> None:
        heads = self.heads
        for head in heads.values():
            head.bind(heads)

    def add_head(self, head_config, tokenizer) -> OutputHead:
        """Add an output head in a later stage: record its config, add its tokens to the LLM (trainable
        rows; tokens added before keep theirs) and build its module (trainable per its config)."""
        name = head_config.name
        if name in self.config.head_configs:
            raise ValueError(f"this model already has a head named {name!r}")
        self.llm.add_special_tokens(head_config.tokens, tokenizer, self.config)
        head_config = head_config.for_model(self.config)
        heads = dict(self.config.heads)
        heads[name] = head_config.to_dict()
        self.config.heads = heads
        self.config.trainable = {**head_config.components, **self.config.trainable}
        self.config.component_paths = {**head_config.component_paths, **self.config.component_paths}
        head = build_head(self.config.head_configs[name], self.config)
        self.add_module(name, head.to(self.device))
        self.head_names.append(name)
        self._bind_heads()
        self.apply_trainable_policy()
        return head

    def extend_head(self, name: str, tokenizer, **changes) -> OutputHead:
        """Give a trained head more to do (the act head a new task: `tasks=[..., "edit"]`): its config with
        `changes`, the new config's tokens added (rows added before keep theirs), the head rebuilt and
        every weight it had copied in; what is new starts as a fresh head's does. Changes that reshape a
        weight the head already has are refused."""
        if name not in self.config.head_configs:
            raise ValueError(f"this model has no head named {name!r}; heads: {self.head_names}")
        old = getattr(self, name)
        head_config = dataclasses.replace(self.config.head_configs[name], **changes).for_model(self.config)
        trial = copy.deepcopy(self.config)  # the model's config changes only once the new head fits
        trial.heads = {**trial.heads, name: head_config.to_dict()}
        trial.component_paths = {**head_config.component_paths, **trial.component_paths}
        head = build_head(trial.head_configs[name], trial).to(self.device)
        new_weights = head.state_dict()
        reshaped = [k for k, v in old.state_dict().items() if k not in new_weights or new_weights[k].shape != v.shape]
        if reshaped:
            raise ValueError(f"extending head {name!r} with {changes} would drop or reshape its trained weights "
                             f"{reshaped[:5]}; train a new head instead")
        self.llm.add_special_tokens(head_config.tokens, tokenizer, self.config)
        self.config.heads = trial.heads
        self.config.trainable = {**head_config.components, **self.config.trainable}
        self.config.component_paths = trial.component_paths
        head.load_state_dict(old.state_dict(), strict=False)
        setattr(self, name, head)
        self._bind_heads()
        self.apply_trainable_policy()
        return head

    # -- weights ---------------------------------------------------------------------------
    def post_init(self):
        super().post_init()
        # transformers collects tied-weight keys only from *direct* PreTrainedModel children; ours sit one
        # level down (`llm.model`), so without this a tied LM (OPT, GPT-2) loses its lm_head on load.
        for prefix, module in self.named_modules():
            if module is not self and isinstance(module, PreTrainedModel):
                for target, source in getattr(module, "all_tied_weights_keys", {}).items():
                    self.all_tied_weights_keys[f"{prefix}.{target}"] = f"{prefix}.{source}"

    def _init_weights(self, module: nn.Module) -> None:
        # Only the bridge is ours to initialise; HF sub-models initialise themselves.
        std = self.config.initializer_range
        if module is self.qformer:
            nn.init.normal_(module.query_tokens, std=std)
        elif module is self.projection:
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, QFormerTextHeads):
            for sub in module.modules():
                if isinstance(sub, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(sub.weight, std=std)
                if isinstance(sub, nn.Linear) and sub.bias is not None:
                    nn.init.zeros_(sub.bias)
                if isinstance(sub, nn.LayerNorm):
                    nn.init.ones_(sub.weight)
                    nn.init.zeros_(sub.bias)
            with torch.no_grad():
                module.logit_scale.fill_(math.log(1 / 0.07))

    def apply_trainable_policy(self) -> None:
        """Freeze components per `config.trainable`; frozen parts also go to eval mode (no dropout)."""
        for name in self.config.components:
            self.get_submodule(name).requires_grad_(self.config.trainable[name])
        # Rows of added special tokens and LoRA adapters train even inside a frozen LLM.
        for param_name, param in self.llm.named_parameters():
            if is_llm_adapter(param_name):
                param.requires_grad_(True)
        self.train(self.training)

    def add_llm_lora(self, lora: dict) -> None:
        """LoRA adapters on the frozen LLM (peft `LoraConfig` arguments); they train, the LLM does not."""
        self.llm.add_lora(lora, self.config)
        self.apply_trainable_policy()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.config.components:
            if not self.config.trainable[name]:
                self.get_submodule(name).eval()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def component_state_dict(self, exclude: set[str]) -> dict[str, torch.Tensor]:
        """State dict without the components in `exclude` (those referenced by path), except their
        trainable parameters and peft adapters (rows of added tokens, LoRA) inside a frozen LLM,
        which the referenced directories do not hold."""
        prefixes = tuple(f"{name}." for name in exclude)
        kept = self._trained_or_adapter_names()
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefixes) or k in kept}

    def _trained_or_adapter_names(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad or is_llm_adapter(n)}

    # -- forward ---------------------------------------------------------------------------
    def get_image_features(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                           qformer_attention_mask: torch.Tensor | None = None,
                           vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """(num_images, 3, H, W) -> soft prompts (num_images, num_query_tokens, llm_hidden).

        `qformer_input_ids` (one row per image) are the instructions of an instruction-aware Q-Former;
        `vision_features` skips the vision encoder when its output is already at hand."""
        return self.project_queries(self.get_query_states(pixel_values, qformer_input_ids, qformer_attention_mask,
                                                          vision_features))

    def project_queries(self, query_states: torch.Tensor) -> torch.Tensor:
        """The Q-Former's query outputs -> the LM's soft prompts (the bridge's projection)."""
        return self.projection(query_states.to(self.projection.weight.dtype))

    def get_query_states(self, pixel_values: torch.Tensor, qformer_input_ids: torch.Tensor | None = None,
                         qformer_attention_mask: torch.Tensor | None = None,
                         vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """(num_images, 3, H, W) -> the Q-Former's query outputs (num_images, num_query_tokens, qformer_hidden),
        before the projection (what its object heads read)."""
        if self.config.qformer_instruction and qformer_input_ids is None:
            raise ValueError("this model's Q-Former reads the instruction with each image "
                             "(config.qformer_instruction): pass qformer_input_ids, as the processor returns them")
        if vision_features is None:
            vision_features = self.vision(pixel_values)
        return self.qformer(vision_features.to(self.qformer.query_tokens.dtype),
                            instruction_ids=qformer_input_ids, instruction_mask=qformer_attention_mask)

    def region_head(self) -> OutputHead | None:
        """The head whose encoder fills `<region>` placeholders (visual prompts), if any."""
        return next((h for h in self.heads.values() if h.config.region_token), None)

    def region_features(self, pixel_values: torch.Tensor, region_image_index: torch.Tensor,
                        region_masks: torch.Tensor, vision_features: torch.Tensor | None = None,
                        qformer_input_ids: torch.Tensor | None = None,
                        qformer_attention_mask: torch.Tensor | None = None,
                        query_states: torch.Tensor | None = None) -> torch.Tensor:
        """Visual prompts -> one input embedding per region: (R, llm_hidden). `vision_features` (per image):
        the frozen ViT's, if already computed (the region encoder may pool them); `qformer_input_ids` /
        `qformer_attention_mask` (per image): the instructions an instruction-aware Q-Former reads, for a
        head that reads the regions from its queries (`ActConfig.region_from_queries`); `query_states` (per
        image): those queries' outputs, if already computed (`get_query_states`)."""
        head = self.region_head()
        if head is None:
            raise ValueError("the prompt marks a region, but this model has no head that reads visual prompts")
        if head.config.region_from_queries:
            index = region_image_index
            if query_states is not None:
                queries = query_states[index]
            else:
                if vision_features is None:
                    vision_features = self.vision(pixel_values[index])
                else:
                    vision_features = vision_features[index]
                queries = self.get_query_states(
                    pixel_values[index], None if qformer_input_ids is None else qformer_input_ids[index],
                    None if qformer_attention_mask is None else qformer_attention_mask[index], vision_features)
            return head.region_encoder(self.project_queries(queries), self.qformer.objects(queries), region_masks)
        if getattr(head, "reads_patches", False):
            if vision_features is None:
                vision_features = self.vision(pixel_values)
            return head.encode_regions(pixel_values[region_image_index], region_masks,
                                       vision_features[region_image_index])
        return head.encode_regions(pixel_values[region_image_index], region_masks)

    def _scatter_regions(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                         region_features: torch.Tensor | None) -> torch.Tensor:
        head = self.region_head()
        if head is None:
            return inputs_embeds
        is_region = input_ids == self.config.added_tokens[head.config.region_token]
        count = int(is_region.sum())
        if count != (0 if region_features is None else region_features.shape[0]):
            raise ValueError(f"the prompt has {count} <region> placeholder(s) but "
                             f"{0 if region_features is None else region_features.shape[0]} region(s) were given")
        if count == 0:
            return inputs_embeds
        mask = is_region.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, region_features.to(inputs_embeds.dtype))

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None, qformer_input_ids: torch.Tensor | None = None,
                     qformer_attention_mask: torch.Tensor | None = None,
                     vision_features: torch.Tensor | None = None, region_features: torch.Tensor | None = None,
                     region_image_index: torch.Tensor | None = None,
                     region_masks: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with each image's soft prompt placed at its placeholder positions, and each
        marked region's embedding at its `<region>` (from `region_features`, or computed from the images
        with `region_image_index` / `region_masks` as the processor returns them)."""
        if region_features is None and region_masks is not None and len(region_masks):
            if vision_features is None and image_features is None:
                vision_features = self.vision(pixel_values)  # once: for the regions and the soft prompts
            query_states = None
            head = self.region_head()
            if image_features is None and head is not None and head.config.region_from_queries:
                # once: the soft prompts and the regions read the same query outputs
                query_states = self.get_query_states(pixel_values, qformer_input_ids, qformer_attention_mask,
                                                     vision_features)
                image_features = self.project_queries(query_states)
            region_features = self.region_features(pixel_values, region_image_index, region_masks, vision_features,
                                                   qformer_input_ids, qformer_attention_mask, query_states)
        inputs_embeds = self._embed_images(input_ids, pixel_values, image_features, qformer_input_ids,
                                           qformer_attention_mask, vision_features)
        return self._scatter_regions(input_ids, inputs_embeds, region_features)

    def _embed_images(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                      image_features: torch.Tensor | None, qformer_input_ids: torch.Tensor | None,
                      qformer_attention_mask: torch.Tensor | None,
                      vision_features: torch.Tensor | None) -> torch.Tensor:
        image_token_id = self.config.image_token_index
        inputs_embeds = self.llm.embed(input_ids, image_token_id)
        num_slots = 0 if image_token_id is None else int((input_ids == image_token_id).sum())
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.get_image_features(pixel_values, qformer_input_ids, qformer_attention_mask,
                                                     vision_features=vision_features)
        num_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if num_slots != num_features:
            num_images = 0 if image_features is None else image_features.shape[0]
            raise ValueError(
                f"the prompt has {num_slots} image-token positions but {num_images} image(s) were given, which fill "
                f"{num_features} (each image takes {self.config.num_query_tokens} positions)"
            )
        if num_slots == 0:
            return inputs_embeds
        mask = (input_ids == image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_features.to(inputs_embeds.dtype))

    def occurrence_images(self, input_ids: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """For each occurrence at (row, start): the index (in batch order) of the last image placed before
        it in its row — the image a request like "find every red shape" is about — or -1 if none."""
        if self.config.image_token_index is None:
            return torch.full_like(rows, -1)
        is_image = (input_ids == self.config.image_token_index).long()
        before_row = torch.cat([is_image.new_zeros(1), is_image.sum(1).cumsum(0)[:-1]])  # image tokens of earlier rows
        in_row = is_image.cumsum(1)[rows, starts]  # image tokens of this row up to the trigger
        index = (before_row[rows] + in_row) // self.config.num_query_tokens - 1
        return torch.where(in_row > 0, index, torch.full_like(index, -1))

    def head_context(self, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                     vision_features: torch.Tensor | None, images: torch.Tensor | None = None,
                     hidden: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                     pixel_values: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """What a head may read besides its slots' hidden states: the frozen vision encoder's features of
        each occurrence's image (`vision_features`: (occurrences, patches, vision_hidden), zeros where
        the row has no image, `has_image` says which). Decoders that attend to the image (act) use it.
        With `images` (one per image, (num_images, 3, H, W) in [0, 1]), also `images` per occurrence; with
        `pixel_values` (the processor's, normalised), `pixel_values` per occurrence.
        With the LLM's last `hidden` states, also the request's own words: `request_states` (occurrences,
        REQUEST_WINDOW, llm_hidden), the tokens right before each trigger (oldest first), their `request_ids`,
        and `request_mask` (True where a token is real text of that row: not padding, not image queries, not
        before the row)."""
        context = {}
        if hidden is not None:
            context.update(self._request_window(input_ids, rows[:, 0], positions[:, 0], hidden, attention_mask))
        if vision_features is None:  # no image anywhere in the batch
            context["has_image"] = torch.zeros(len(rows), dtype=torch.bool, device=input_ids.device)
            return context
        index = self.occurrence_images(input_ids, rows[:, 0], positions[:, 0])
        features = vision_features[index.clamp(min=0)] * (index >= 0)[:, None, None]
        context.update(vision_features=features, has_image=index >= 0)
        if images is not None:
            context["images"] = images[index.clamp(min=0)] * (index >= 0)[:, None, None, None]
        if pixel_values is not None and len(pixel_values):
            context["pixel_values"] = pixel_values[index.clamp(min=0)] * (index >= 0)[:, None, None, None]
        return context

    def _request_window(self, input_ids: torch.Tensor, rows: torch.Tensor, triggers: torch.Tensor,
                        hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # An open-vocabulary decoder must know *what* was asked ("the triangle", "red shapes"); the slots'
        # states carry it only as far as a frozen LLM passes it on, so the words themselves go along too.
        offsets = torch.arange(-REQUEST_WINDOW, 0, device=input_ids.device)
        index = triggers[:, None] + offsets  # (occurrences, window)
        valid = index >= 0
        index = index.clamp(min=0)
        if attention_mask is not None:
            valid &= attention_mask[rows[:, None], index].bool()
        if self.config.image_token_index is not None:
            valid &= input_ids[rows[:, None], index] != self.config.image_token_index
        ids = input_ids[rows[:, None], index]
        return {"request_states": hidden[rows[:, None], index], "request_mask": valid, "request_ids": ids}

    def head_occurrences(self, input_ids: torch.Tensor) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
        """`(head name, route trigger, rows, positions)` of every route present in `input_ids`; rows and
        positions are (occurrences, 1 + slots) over the trigger and its slots, in reading order."""
        out = []
        for name, head in self.heads.items():
            for trigger, slots in head.config.routes.items():
                trigger_id = self.config.added_tokens.get(trigger)
                if trigger_id is None:
                    raise ValueError(f"head {name!r}: its trigger {trigger!r} is not in the vocabulary; "
                                     "add heads with `model.add_head`")
                rows, positions = slot_positions(input_ids, trigger_id, len(slots))
                if len(rows):
                    out.append((name, trigger, rows, positions))
        return out

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        qformer_text_ids: torch.Tensor | None = None,
        qformer_text_mask: torch.Tensor | None = None,
        qformer_text_rows: torch.Tensor | None = None,
        region_image_index: torch.Tensor | None = None,
        region_masks: torch.Tensor | None = None,
        head_targets: dict | None = None,
        object_targets: list | None = None,
        loss_names: tuple[str, ...] | list[str] | None = None,
        **kwargs,
    ) -> MMBridgeOutput:
        """Every loss the inputs allow, by name, or only those in `loss_names`:

        * `lm` — next-token loss over `labels` (the processor masks prompt and image positions with -100);
        * `lm_turn` — the same with every answer turn weighted alike (`turn_mean_lm_loss`); only when
          `loss_names` asks for it;
        * `lm_first` — the loss of each answer turn's first token alone, averaged over turns (`turn_mean_lm_loss`
          with `first_only`): the token that decides a route or words; only when `loss_names` asks for it;
        * `itc` / `itm` / `itg` — BLIP-2 stage 1 on `qformer_text_ids` (CLS + text + EOS, one row per
          image, as the processor returns with `return_qformer_text=True`); the LLM does not run when
          only these are asked for; `qformer_text_rows` (indices into the batch's images) pairs the texts
          with some images only (a stage mixing captions with chats), otherwise text i goes with image i;
        * `objects` — the Q-Former's object set loss (`modeling/objects.py`) on `object_targets`: one entry
          per image, its objects (`{"box": [cx, cy, w, h] in [0, 1], <attribute>: <class name>, ...}`) or
          `None` for an image without object labels; the queries run on the image alone (no instruction);
        * each head's losses, from its slots' hidden states and `head_targets[head_name]`.
        """
        wanted = set(self.config.loss_names if loss_names is None else loss_names)
        if loss_names is None:
            wanted -= {LM_TURN_LOSS, LM_FIRST_LOSS}  # the default total stays `lm` + the rest, as before they existed
        unknown = wanted - set(self.config.loss_names)
        if unknown:
            raise ValueError(f"this model cannot compute loss(es) {sorted(unknown)}; "
                             f"it has {list(self.config.loss_names)}")
        losses: dict[str, torch.Tensor] = {}
        vision_features = None
        stage1 = sorted(wanted & set(QFORMER_LOSSES)) if qformer_text_ids is not None else []
        if stage1:
            vision_features = self.vision(pixel_values)
            paired = vision_features if qformer_text_rows is None else vision_features[qformer_text_rows]
            losses.update(self.qformer.stage1_losses(
                paired.to(self.qformer.query_tokens.dtype), qformer_text_ids, qformer_text_mask,
                cls_token_id=self.config.qformer_cls_token_id, dec_token_id=self.config.qformer_dec_token_id,
                losses=stage1))
        if OBJECT_LOSS in wanted and object_targets is not None and any(t is not None for t in object_targets):
            if vision_features is None:
                vision_features = self.vision(pixel_values)
            if len(object_targets) != len(vision_features):
                raise ValueError(f"object_targets has {len(object_targets)} entries for {len(vision_features)} images")
            queries = self.qformer(vision_features.to(self.qformer.query_tokens.dtype))
            losses[OBJECT_LOSS] = self.qformer.objects.loss(queries, object_targets)
        run_llm = input_ids is not None or inputs_embeds is not None
        if loss_names is not None and not wanted - set(IMAGE_LOSSES):
            run_llm = False  # stage 1: the LLM plays no part
        llm_out, head_outputs = None, {}
        need_heads = bool(self.head_names) and input_ids is not None and head_targets is not None
        if run_llm and need_heads and vision_features is None and pixel_values is not None and len(pixel_values):
            vision_features = self.vision(pixel_values)  # once: for the soft prompts and the heads' context
        if run_llm:
            if labels is not None and not (labels != -100).any():
                raise ValueError("every label is -100 (ignored), so the loss would be NaN: no sample in this batch "
                                 "has answer tokens to train on")
            if inputs_embeds is None:
                inputs_embeds = self.embed_inputs(input_ids, pixel_values, qformer_input_ids=qformer_input_ids,
                                                  qformer_attention_mask=qformer_attention_mask,
                                                  vision_features=vision_features,
                                                  region_image_index=region_image_index, region_masks=region_masks)
            llm_out = self.llm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels if "lm" in wanted else None,
                past_key_values=past_key_values,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states or need_heads,
                return_dict=True,
                **kwargs,
            )
            if llm_out.loss is not None:
                losses["lm"] = llm_out.loss
            if LM_TURN_LOSS in wanted and labels is not None:
                losses[LM_TURN_LOSS] = turn_mean_lm_loss(llm_out.logits, labels)
            if LM_FIRST_LOSS in wanted and labels is not None:
                losses[LM_FIRST_LOSS] = turn_mean_lm_loss(llm_out.logits, labels, first_only=True)
            if need_heads:  # head_targets: route trigger -> one target per occurrence, in reading order
                hidden = llm_out.hidden_states[-1]
                for name, trigger, rows, positions in self.head_occurrences(input_ids):
                    head_outputs[trigger] = {"hidden_states": hidden[rows, positions], "rows": rows[:, 0],
                                             "positions": positions[:, 0]}
                    if trigger not in head_targets:
                        continue
                    context = self.head_context(input_ids, rows, positions, vision_features, hidden=hidden,
                                                attention_mask=attention_mask, pixel_values=pixel_values)
                    for key, value in self.heads[name].loss(hidden[rows, positions], head_targets[trigger],
                                                            trigger, context).items():
                        if key in wanted:  # routes of one head reporting the same loss add up
                            losses[key] = losses[key] + value if key in losses else value
        return MMBridgeOutput(
            loss=sum(losses.values()) if losses else None,
            losses=losses,
            logits=None if llm_out is None else llm_out.logits,
            past_key_values=None if llm_out is None else llm_out.past_key_values,
            hidden_states=None if llm_out is None or not output_hidden_states else llm_out.hidden_states,
            attentions=None if llm_out is None else llm_out.attentions,
            head_outputs=head_outputs,
        )

    @torch.no_grad()
    def decode_heads(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     image_features: torch.Tensor | None = None, vision_features: torch.Tensor | None = None,
                     region_features: torch.Tensor | None = None,
                     images: torch.Tensor | None = None) -> list[tuple[int, int, str, str, dict]]:
        """Run every head found in finished sequences (prompt + answer, left-padded) and return
        `(row, position of the trigger, head name, route trigger, decoded tensors of that occurrence)`
        in reading order. `images`: the input images' pixels in [0, 1] (what an editing route starts from)."""
        if not self.head_names:
            return []
        embeds = self.embed_inputs(input_ids, image_features=image_features, region_features=region_features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          output_hidden_states=True, return_dict=True).hidden_states[-1]
        found = []
        for name, trigger, rows, positions in self.head_occurrences(input_ids):
            context = self.head_context(input_ids, rows, positions, vision_features, images, hidden, attention_mask)
            decoded = self.heads[name].decode(hidden[rows, positions], trigger, context)
            for i in range(len(rows)):
                found.append((int(rows[i, 0]), int(positions[i, 0]), name, trigger,
                              {k: v[i] for k, v in decoded.items()}))
        return sorted(found, key=lambda item: (item[0], item[1]))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 qformer_input_ids: torch.Tensor | None = None, qformer_attention_mask: torch.Tensor | None = None,
                 region_image_index: torch.Tensor | None = None, region_masks: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """transformers `generate` on the LLM with the image soft prompts (and marked regions) in place.

        Takes left-padded `input_ids`; returns only the new tokens, as HF does for `inputs_embeds`.
        """
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, qformer_input_ids=qformer_input_ids,
                                          qformer_attention_mask=qformer_attention_mask,
                                          region_image_index=region_image_index, region_masks=region_masks)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.llm.hook_output_layer()
        return self.llm.model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, generation_config=generation_config, **kwargs
        )

    # -- save / load -----------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, trainable_only: bool = False, **kwargs) -> None:
        """Write config + safetensors.

        `trainable_only=True` writes the MiniGPT-4-style small artifact: only parameters with
        `requires_grad`, on top of components that `config.component_paths` must reference.
        Components listed in `component_paths` are never duplicated into the directory.
        """
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if trainable_only:
            missing = [n for n in self.config.components
                       if not self.config.trainable[n] and n not in self.config.component_paths]
            if missing:
                raise ValueError(
                    f"trainable_only=True needs config.component_paths for the frozen component(s) {missing}; "
                    "otherwise their weights would be lost"
                )
        if trainable_only or self.config.component_paths:
            self.config.save_pretrained(save_directory)
            if trainable_only:  # the trained parameters, and adapters even where this stage froze them
                kept = self._trained_or_adapter_names()
                state = {k: v for k, v in self.state_dict().items() if k in kept}
            else:
                state = self.component_state_dict(set(self.config.component_paths))
            state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(state, str(save_directory / TRAINABLE_WEIGHTS_NAME), metadata={"format": "pt"})
            return
        super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_components(cls, config: MMBridgeConfig, dtype: torch.dtype | None = None) -> MMBridgeModel:
        """Build with the components of `config.component_paths` loaded from their own HF dirs."""
        paths = config.component_paths
        # A head's frozen parts (the draw head's diffusion stack) are loaded by that head itself.
        head_parts = {c for head in config.head_configs.values() for c in head.components}
        unsupported = set(paths) - {"vision", "llm"} - head_parts
        if unsupported:
            raise ValueError(f"component_paths supports 'vision', 'llm' and the heads' components, "
                             f"not {sorted(unsupported)}")
        vision_model = language_model = None
        if "vision" in paths:
            vision_model = load_component("vision", _local_dir(paths["vision"]), dtype=dtype)
            config.vision_config = vision_model.config
            config.qformer_config.encoder_hidden_size = vision_model.config.hidden_size
        if "llm" in paths:
            language_model = load_component("llm", _local_dir(paths["llm"]), dtype=dtype)
            if config.added_tokens:
                language_model.resize_token_embeddings(config.text_config.vocab_size, mean_resizing=False)
            config.text_config = language_model.config
        return cls(config, vision_model=vision_model, language_model=language_model)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, dtype: torch.dtype | None = None,
                        quantize: str | None = None, **kwargs):
        """Load a saved model (full or small artifact). As after construction, the config's trainable
        policy holds (frozen parts `requires_grad=False`), and the model is in eval mode as transformers
        leaves it; `model.train()` then switches only the trainable parts to training mode.

        `dtype` converts every float weight as it is read; `quantize="int8"` (one scale per row, fastest)
        or `"int8-g32"` (one per 32 columns, closer to fp32) gives the LLM int8 weight-only linears
        (`modeling.quantize`), quantized from the stored weights while they are read
        where the LLM has no adapters (else after loading, adapters merged first), the rest of the model
        in `dtype` (default fp32). Either way the peak memory is the converted model plus a chunk of the
        file, not the stored model (`modeling.loading`)."""
        if quantize not in (None, *QUANTIZE_CHOICES):
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, not {quantize!r}")
        path = _local_dir(pretrained_model_name_or_path)
        small_artifact = path / TRAINABLE_WEIGHTS_NAME
        if not small_artifact.exists():
            files = safetensors_files(path)
            if files and not args and not kwargs and (quantize is not None or needs_conversion(files, dtype)):
                config = MMBridgeConfig.from_pretrained(path)
                model = load_streaming(lambda: cls(config), files, dtype, quantize_under=(
                    (lambda m: None if m.llm.has_adapters else m.llm.model) if quantize is not None else None),
                    group_size=GROUP_SIZES.get(quantize))
                if model is not None:
                    model.apply_trainable_policy()
                    return model.eval()._quantize(quantize)
            return cls._from_pretrained_full(path, *args, dtype=dtype, **kwargs)._quantize(quantize)
        config = MMBridgeConfig.from_pretrained(path)
        config.component_paths = {name: _inside(path, part) for name, part in config.component_paths.items()}
        model = cls.from_components(config, dtype=dtype)
        state = load_file(str(small_artifact))
        expected = model.state_dict()
        unknown = sorted(set(state) - set(expected))
        if unknown:
            raise ValueError(f"{small_artifact} holds weights this model does not have: {unknown[:5]}")
        bad_shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                      for k, v in state.items() if v.shape != expected[k].shape]
        if bad_shapes:
            raise ValueError(f"shape mismatch loading {small_artifact}: " + "; ".join(bad_shapes[:5]))
        model.load_state_dict(state, strict=False)
        if dtype is not None:
            model.to(dtype)
        model.apply_trainable_policy()
        return model.eval()._quantize(quantize)

    def _quantize(self, quantize: str | None) -> MMBridgeModel:
        """int8 linears in the LLM unless it has them already (quantized while loading); adapters merged
        first, so that every linear is quantized."""
        if quantize is not None and not has_int8(self.llm.model):
            merge_adapters_(self.llm.model)
            quantize_int8_(self.llm.model, GROUP_SIZES[quantize])
        return self

    @classmethod
    def _from_pretrained_full(cls, path: Path, *args, dtype: torch.dtype | None = None, **kwargs):
        # transformers' loader swaps in freshly loaded parameters, which forget `requires_grad`.
        model = super().from_pretrained(path, *args, dtype=dtype, **kwargs)
        model.apply_trainable_policy()
        return model.eval()


def _inside(model_dir: Path, part: str) -> str:
    """A component path relative to the model's own directory when it is there (a self-contained export)."""
    return str(model_dir / part) if not Path(part).is_absolute() and (model_dir / part).is_dir() else part


def _local_dir(path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is not a local directory. mmbridge loads weights from local directories only "
            "(model hubs are not contacted); for the shipped model use the name 'shapes'."
        )
    return path


def turn_mean_lm_loss(logits: torch.Tensor, labels: torch.Tensor, first_only: bool = False) -> torch.Tensor:
    """Next-token cross-entropy averaged over each answer turn's tokens (a turn: a run of labelled positions),
    then over the batch's turns — so that a one-word answer ("red") weighs what a sentence does. The usual
    per-token mean (`lm`) lets a few long answers outweigh many short ones (run f1: the one-token region answers
    were 4.5 % of act stage 2's answer tokens, and the LoRA did not learn to read the region). `first_only`:
    each turn's first token alone — the one that decides between a routing token and words, 1/27 of a refusal
    sentence's turn mean (runs g2 / g3). Written by hand: transformers' causal-LM loss reduces per token only."""
    targets = labels[:, 1:]
    answer = targets != -100
    if not answer.any():
        raise ValueError("every label is -100 (ignored): no answer turn to average over")
    tokens = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                             reduction="none").view_as(targets)
    starts = answer & ~F.pad(answer[:, :-1], (1, 0), value=False)  # a row's first labelled position starts a turn
    if first_only:
        return tokens[starts].mean()
    turn = starts.flatten().long().cumsum(0).view_as(answer) - 1
    count = int(starts.sum())
    sums = tokens.new_zeros(count).index_add(0, turn[answer], tokens[answer])
    sizes = tokens.new_zeros(count).index_add(0, turn[answer], torch.ones_like(tokens[answer]))
    return (sums / sizes).mean()

