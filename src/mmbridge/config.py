"""Typed, nested configuration of a composed mmbridge model, saved next to its weights.

`MMBridgeConfig` follows transformers' composite configs (as `Blip2Config` / `LlavaConfig`): each
frozen or trainable part has its own sub-config, resolved through `AutoConfig` by `model_type`, so any
HF vision encoder and any HF causal LM can be plugged in. Wave-2 parts (draw, act) have their slots
already so that a saved wave-1 model stays loadable once they are filled.
"""

from __future__ import annotations

from transformers import AutoConfig, Blip2QFormerConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from mmbridge.heads_config import ActConfig, DrawConfig, HeadConfig, build_head_config

#: The see-model's components; heads add theirs (`MMBridgeConfig.components`). Each can be frozen,
#: trained, or loaded from a separate directory.
COMPONENTS = ("vision", "qformer", "projection", "llm")
#: Losses the base model reports: the LM's, and BLIP-2 stage 1's on a Q-Former with a text side.
#: `lm_turn` is the LM's loss with every answer turn weighted alike; computed only when a stage asks for it.
#: `lm_first` is the LM's loss on each answer turn's first token alone (the token that decides what kind of answer
#: follows: a routing token or words); computed only when a stage asks for it.
BASE_LOSSES = ("lm", "lm_turn", "lm_first")
LM_TURN_LOSS = "lm_turn"
LM_FIRST_LOSS = "lm_first"
QFORMER_LOSSES = ("itc", "itm", "itg")
#: Losses on the image side alone (the LLM need not run for them): stage 1's and the object set loss.
OBJECT_LOSS = "objects"
IMAGE_LOSSES = (*QFORMER_LOSSES, OBJECT_LOSS)

#: MiniGPT-4 / BLIP-2 default: only the bridge (Q-Former + projection) trains.
DEFAULT_TRAINABLE = {"vision": False, "qformer": True, "projection": True, "llm": False}


class MMBridgeConfig(PreTrainedConfig):
    r"""
    vision_config: any HF vision encoder config (`vit`, `clip_vision_model`, `siglip_vision_model`,
        `blip_2_vision_model`, ...).
    qformer_config: a `Blip2QFormerConfig`; its `encoder_hidden_size` is tied to the vision width.
    text_config: any HF causal-LM config (`llama`, `opt`, `gpt2`, ...).
    num_query_tokens: learned queries of the Q-Former = soft-prompt tokens per image.
    vision_feature_layer: hidden state of the vision encoder fed to the Q-Former; `None` means the
        encoder's `last_hidden_state` (what HF BLIP-2 uses), an int indexes `hidden_states`.
    drop_cls_token: drop the first vision token (CLIP/ViT CLS) before the Q-Former.
    projection_bias: the projection (`nn.Linear`) has a bias, as BLIP-2's and MiniGPT-4's do.
    projection_norm: the projection ends in an RMS normalisation to the frozen LLM's input-embedding
        scale, so soft-prompt vectors are as large as token embeddings (`modeling/bridge.py` says
        why). Off by default: BLIP-2 / MiniGPT-4 have a plain linear bridge, and their imported
        weights keep bit-level parity. The shapes recipe composes its models with it on.
    projection_norm_scale: the RMS (per element) every soft-prompt vector is scaled to; `None` with
        `projection_norm` means "measure it": the mean RMS of the LLM's token embeddings when the
        model is built, written back here so that it is saved with the model.
    image_token / image_token_index: the tokenizer's placeholder. The processor expands each image
        placeholder to `num_query_tokens` copies; the model scatters projected queries into them.
    trainable: component -> bool. Frozen components get `requires_grad=False` and `eval()`.
    component_paths: component -> local HF directory. Such a component is loaded from there and
        not stored in this model's safetensors (the MiniGPT-4 "small checkpoint" layout). A relative
        path that exists inside the model's directory is read from there (an exported model carries
        its draw generator as `generator/`), else from the working directory.
    added_tokens: token -> id of special tokens added to the LLM (e.g. `[IMG0]`); only their
        embedding (and untied output) rows train.
    image_text_hidden_size: when set, the Q-Former also gets BLIP-2's text side (text embeddings,
        ITC projections to this width, ITM head, ITG language-model head) for stage-1
        representation learning and image-text retrieval; `None` (the default) keeps the bare
        query transformer, which is all a see-model needs to chat.
    qformer_cls_token_id / qformer_dec_token_id: the Q-Former's text starts with CLS for ITC/ITM and
        with DEC for ITG (BERT's [CLS] and BLIP-2's added [DEC]), as ids of the model's tokenizer.
    qformer_instruction: InstructBLIP's instruction-aware Q-Former — the text of the user turn that
        holds an image enters the Q-Former next to the queries (bi-directional self-attention), so
        the queries extract what the question asks for. Needs the text side (`image_text_hidden_size`);
        the processor then returns `qformer_input_ids` / `qformer_attention_mask`, one row per image.
    qformer_object_attributes: attribute name -> class names (e.g. `{"color": [...], "shape": [...]}`).
        When set, the Q-Former gets DETR-style object heads and the model reports the `objects` loss: each
        labelled object is matched to one query, which must predict all its attributes and its box, so
        that one query holds one object's attributes together (`modeling/objects.py` says why).
    llm_lora: peft `LoraConfig` arguments (`r`, `lora_alpha`, `target_modules`, ...) of LoRA adapters on
        the frozen LLM (MiniGPT-4 v2 / LLaVA fine-tune it this way). The LLM's own weights never change;
        only the adapters' low-rank matrices train and are saved. `None`: no adapters.
    draw_config / act_config: the draw head (MiniGPT-5 vokens, `DrawConfig`) and the act head (VisionLLM
        v2 routing tokens, `ActConfig`), stored as dicts and validated through their typed configs.
    heads: further output heads, name -> `{"kind": ..., ...}` of a registered head kind.
    The component list — what `trainable`, `component_paths`, checkpoints and importers key on — is
    the base four plus the components of every enabled head (`components`).
    """

    model_type = "mmbridge"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit"),
        "qformer_config": Blip2QFormerConfig,
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    vision_feature_layer: int | None = None
    drop_cls_token: bool = False
    projection_bias: bool = True
    projection_norm: bool = False
    projection_norm_scale: float | None = None
    image_token: str = "<ImageHere>"
    image_token_index: int | None = None
    trainable: dict | None = None
    component_paths: dict | None = None
    added_tokens: dict | None = None
    image_text_hidden_size: int | None = None
    qformer_cls_token_id: int | None = None
    qformer_dec_token_id: int | None = None
    qformer_instruction: bool = False
    qformer_object_attributes: dict | None = None
    llm_lora: dict | None = None
    draw_config: dict | None = None
    act_config: dict | None = None
    heads: dict | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if self.image_text_hidden_size:
            self.qformer_config.use_qformer_text_input = True  # text tokens get their own feed-forward
        for slot, cls in (("draw_config", DrawConfig), ("act_config", ActConfig)):
            value = getattr(self, slot)
            if isinstance(value, HeadConfig):
                value = value.to_dict()
            if value is not None:
                setattr(self, slot, {**value, "kind": cls.kind})
        self.heads = {name: (h.to_dict() if isinstance(h, HeadConfig) else dict(h))
                      for name, h in (self.heads or {}).items()}
        head_configs = self.head_configs  # validates every head now, not at first use
        head_defaults = {c: t for head in head_configs.values() for c, t in head.components.items()}
        self.trainable = {**DEFAULT_TRAINABLE, **head_defaults, **(self.trainable or {})}
        head_paths = {c: p for head in head_configs.values() for c, p in head.component_paths.items()}
        self.component_paths = {**head_paths, **(self.component_paths or {})}
        self.added_tokens = dict(self.added_tokens or {})
        unknown = (set(self.trainable) | set(self.component_paths)) - set(self.components)
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)}; known: {list(self.components)}")
        if self.qformer_instruction and not self.image_text_hidden_size:
            raise ValueError("qformer_instruction needs the Q-Former's text side: set image_text_hidden_size")
        for name, values in (self.qformer_object_attributes or {}).items():
            if not isinstance(values, (list, tuple)) or len(values) < 2 or len(set(values)) != len(values):
                raise ValueError(f"qformer_object_attributes[{name!r}] must list >= 2 distinct class names, "
                                 f"got {values!r}")
        if self.projection_norm_scale is not None and not self.projection_norm_scale > 0:
            raise ValueError(f"projection_norm_scale must be > 0, got {self.projection_norm_scale}")
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")

    @property
    def image_token_id(self) -> int | None:
        return self.image_token_index

    @property
    def head_configs(self) -> dict[str, HeadConfig]:
        """Every enabled head's typed config, by name (draw, act, then `heads` in order)."""
        raw = {}
        if self.draw_config is not None:
            raw["draw"] = self.draw_config
        if self.act_config is not None:
            raw["act"] = self.act_config
        for name, head in self.heads.items():
            if name in raw:
                raise ValueError(f"head name {name!r} is taken by draw_config / act_config")
            raw[name] = head
        configs = {name: build_head_config(name, head) for name, head in raw.items()}
        clash = set(COMPONENTS) & {c for h in configs.values() for c in h.components}
        if clash:
            raise ValueError(f"head component name(s) {sorted(clash)} clash with the base components")
        return configs

    @property
    def components(self) -> tuple[str, ...]:
        """The base four, then each enabled head's components."""
        extra = [c for head in self.head_configs.values() for c in head.components]
        return (*COMPONENTS, *dict.fromkeys(extra))

    @property
    def loss_names(self) -> tuple[str, ...]:
        """Every loss this model can report (what a stage config may weight)."""
        names = list(BASE_LOSSES)
        if self.image_text_hidden_size:
            names += QFORMER_LOSSES
        if self.qformer_object_attributes:
            names.append(OBJECT_LOSS)
        return (*names, *(n for head in self.head_configs.values() for n in head.loss_names))


__all__ = ["MMBridgeConfig", "COMPONENTS", "DEFAULT_TRAINABLE", "BASE_LOSSES", "LM_TURN_LOSS", "LM_FIRST_LOSS",
           "QFORMER_LOSSES", "OBJECT_LOSS", "IMAGE_LOSSES", "DrawConfig", "ActConfig", "HeadConfig"]
