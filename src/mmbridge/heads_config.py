"""Typed configs of the output heads (plain data: nothing here imports modeling, torch or diffusers).

A head is a small module on top of the frozen LLM: the LLM emits one of the head's *trigger* tokens, that
route's *slot* tokens follow (forced during generation), and their last hidden states feed the head,
which returns tensors (a loss in training, a prediction at inference). MiniGPT-5's vokens are one route,
trigger `[IMG0]` with slots `[IMG1]…[IMG7]`; VisionLLM v2's routing tokens `[DET]`, `[SEG]`, … are one
route each, with their super-link queries as slots — a learned embedding row per slot token is exactly
a learned query (per-task tables: each route its own slot tokens; a shared table: the same ones).

Configs are stored in `MMBridgeConfig` as JSON dicts (`{"kind": ..., ...}`) and validated through the
dataclass registered for their kind, so a typo fails when the config is built, not in a forward pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

#: kind -> config class; `register_head_config` adds kinds (the draw / act issues, tests' toy heads).
HEAD_CONFIGS: dict[str, type[HeadConfig]] = {}


def register_head_config(cls: type[HeadConfig]) -> type[HeadConfig]:
    HEAD_CONFIGS[cls.kind] = cls
    return cls


@dataclass
class HeadConfig:
    """What every head declares. `name` is the head's key in the model (its module lives at `heads.<name>`)."""

    kind: ClassVar[str] = ""
    #: names of the losses this head reports in `MMBridgeOutput.losses` (stage configs weight them)
    loss_names: ClassVar[tuple[str, ...]] = ()
    #: the head draws images: an image in an assistant message is a target for it (the processor's `image_head`)
    draws_images: ClassVar[bool] = False

    @property
    def region_token(self) -> str | None:
        """A placeholder this head fills in the LLM's *input* (visual prompts: the act head's region
        encoder turns a marked region of an input image into the embedding at `<region>`)."""
        return None
    name: str = ""
    trigger: str = ""  # the token the LLM emits to call the head
    num_slots: int = 0  # tokens forced after the trigger; their hidden states (with the trigger's) feed the head
    trainable: bool = True  # default for the head's own component in `MMBridgeConfig.trainable`

    @property
    def slot_tokens(self) -> list[str]:
        return [f"{self.trigger[:-1]}_{i}]" if self.trigger.endswith("]") else f"{self.trigger}_{i}"
                for i in range(self.num_slots)]

    @property
    def routes(self) -> dict[str, list[str]]:
        """Trigger token -> the slot tokens forced after it. One route unless a kind has several."""
        return {self.trigger: self.slot_tokens}

    @property
    def tokens(self) -> list[str]:
        """Special tokens this head adds to the LLM's vocabulary (their rows train), each once."""
        routed = [t for trigger, slots in self.routes.items() for t in (trigger, *slots)]
        return list(dict.fromkeys([*routed, *([self.region_token] if self.region_token else [])]))

    @property
    def components(self) -> dict[str, bool]:
        """Component -> trainable by default. A component is a module path in the composed model: the
        head itself (`name`) or, for heads with frozen parts, its sub-modules (`name.mapper`, ...)."""
        return {self.name: self.trainable}

    @property
    def component_paths(self) -> dict[str, str]:
        """Frozen components this head loads from their own directory (like the vision encoder and
        the LLM can be): they are referenced by path, never copied into the model's weights."""
        return {}

    def validate(self) -> None:
        if not self.name:
            raise ValueError(f"a {self.kind} head needs a name")
        if not self.routes or not all(self.routes):
            raise ValueError(f"head {self.name!r}: set its trigger token (e.g. '[DET]')")
        if self.num_slots < 0:
            raise ValueError(f"head {self.name!r}: num_slots must be >= 0, got {self.num_slots}")
        if set(self.routes) & {t for slots in self.routes.values() for t in slots}:
            raise ValueError(f"head {self.name!r}: a token cannot be both a trigger and a slot")

    def for_model(self, model_config) -> HeadConfig:
        """This config with the settings that depend on the model it is added to filled in (recorded with
        the model, so that it loads with the same shapes). Called by `MMBridgeModel.add_head`."""
        return self

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@register_head_config
@dataclass
class DrawConfig(HeadConfig):
    """MiniGPT-5: vokens `[IMG0]`…`[IMG7]` -> feature mapper -> conditioning of a frozen diffusion UNet.

    The frozen image generator (VAE, UNet, scheduler, text encoder) is referenced by `pipeline_path`, a
    diffusers `StableDiffusionPipeline` directory; it loads through diffusers."""

    kind: ClassVar[str] = "draw"
    loss_names: ClassVar[tuple[str, ...]] = ("draw_ldm", "draw_caption")
    draws_images: ClassVar[bool] = True
    name: str = "draw"
    trigger: str = "[IMG0]"
    num_slots: int = 7  # [IMG1]…[IMG7], forced after [IMG0]
    pipeline_path: str | None = None  # a local diffusers StableDiffusionPipeline directory
    mapper_hidden_size: int = 1024  # Linear(llm -> 1024)-GELU-Linear(1024 -> 1024)
    mapper_layers: tuple[int, int] = (4, 4)  # nn.Transformer encoder / decoder layers
    mapper_heads: int = 8
    num_condition_queries: int | None = None  # learned decoder queries; None: the text encoder's length (SD: 77)
    # the mapper reads the request's words before `[IMG0]` too (the LLM's states there and the token ids), not only
    # the vokens: off is MiniGPT-5's mapper; on lets a small frozen LLM's request reach the generator whole
    mapper_reads_request: bool = False
    condition_dropout: float = 0.1  # classifier-free guidance: voken features -> zeros in training
    guidance_scale: float = 7.5
    num_inference_steps: int = 25  # DDIM steps when the model draws
    sample_seed: int = 0  # the initial noise of a drawing (same prompt, same image)
    snr_gamma: float | None = 5.0  # Min-SNR loss weighting

    @property
    def slot_tokens(self) -> list[str]:
        return [f"[IMG{i}]" for i in range(1, self.num_slots + 1)]

    @property
    def components(self) -> dict[str, bool]:
        # the mapper trains; the diffusion stack is frozen like the vision encoder and the LLM
        return {f"{self.name}.mapper": True, f"{self.name}.generator": False}

    @property
    def component_paths(self) -> dict[str, str]:
        return {f"{self.name}.generator": self.pipeline_path} if self.pipeline_path else {}

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ValueError(f"draw: condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if (self.num_condition_queries is not None and self.num_condition_queries < 1) or self.mapper_hidden_size < 1:
            raise ValueError("draw: num_condition_queries and mapper_hidden_size must be >= 1")
        if self.mapper_hidden_size % self.mapper_heads:
            raise ValueError(f"draw: mapper_hidden_size {self.mapper_hidden_size} must be a multiple of "
                             f"mapper_heads {self.mapper_heads}")
        if self.num_inference_steps < 1:
            raise ValueError("draw: num_inference_steps must be >= 1")


ACT_ROUTES = ("det", "seg", "grd", "pose", "gen", "edit")


@register_head_config
@dataclass
class ActConfig(HeadConfig):
    """VisionLLM v2: routing tokens `[DET]`, `[SEG]`, … each followed by its task's super-link queries."""

    kind: ClassVar[str] = "act"
    loss_names: ClassVar[tuple[str, ...]] = ("act_cls", "act_l1", "act_giou", "act_relevance", "act_attributes",
                                             "act_mask", "act_dice",
                                             "act_keypoints", "act_oks", "act_visibility",
                                             "act_gen", "act_gen_caption", "act_edit", "act_edit_caption")
    name: str = "act"
    tasks: list[str] = field(default_factory=lambda: ["det", "seg", "grd"])
    queries_per_task: int = 4
    queries_per_generation_task: int = 64  # [GEN] / [EDIT]
    shared_queries: bool = False  # the seed's ablation: one table for every task instead of one per task
    # whether a routing token may follow text in an answer ("Here they are: [DET]"); False where every training
    # answer opens with its route (the ShapesWorld act data): generation then cannot route mid-sentence (run h1
    # routed 4 of 200 captions to [DET] after "A large yellow triangle, ")
    route_mid_answer: bool = True
    # the DETR-style decoder behind [DET] / [SEG] / [GRD]
    decoder_hidden_size: int = 256
    decoder_layers: int = 3
    decoder_heads: int = 8
    num_object_queries: int = 16  # boxes proposed per request (ShapesWorld scenes hold at most 4 objects)
    mask_size: int = 32  # masks are predicted at this resolution (of the whole image)
    score_threshold: float = 0.5  # detections kept at inference
    # masks from a pixel decoder (a conv stem over the image fused with the patches) at 1 / mask_pixel_stride
    # of the image's resolution, not from the patch grid alone (off by default: models saved before it load
    # unchanged). Stride 1 with mask_size = the image size: masks pixel for pixel (a 32-px mask of a 64-px
    # image, upsampled, misses the outline of an 8-20 px shape by a pixel: run d5, mask AP50 0.92, AP 0.55)
    mask_pixel_decoder: bool = False
    mask_pixel_stride: int = 2
    mask_pixel_channels: int = 64  # its conv stem's width (16 at stride 1 costs what 64 does at stride 2)
    # each box refined by one more decoder layer over the pixel decoder's features (needs mask_pixel_decoder)
    box_refinement: bool = False
    # decoding (`crop_to_boxes`): each mask cut to its box enlarged by mask_box_margin of its size, and the box
    # tightened to the cut mask — pixel-exact masks make closer boxes than a regression (every route; [DET]
    # returns no masks)
    masks_in_boxes: bool = False
    mask_box_margin: float = 0.1
    # decoding: a detection whose box overlaps a higher-scored one's at IoU >= this is dropped (NMS); None: off
    duplicate_iou: float | None = None
    # decoding `[POSE]`: a person whose keypoints match a higher-scored one's at OKS >= this is dropped (OKS-NMS;
    # 0.9 as pose evaluations run it); None: off
    duplicate_oks: float | None = None
    # a frozen text tower's config (CLIP's: the foundation's, trained against the ViT) that also reads the
    # request's words for the decoder — category text embeddings grounded in images; None: the LLM's alone
    text_encoder: dict | None = None
    # attribute-factored selection (`AttributeSelection`): each attribute's values, e.g. {"color": [...],
    # "shape": [...]}; the decoder classifies every patch's object by them (targets name the scene's objects:
    # `"objects": {"boxes", <attribute>: [values]}`) and reads which values a request allows. None: off
    selection_attributes: dict[str, list[str]] | None = None
    selection_vocab_size: int | None = None  # its word embeddings' rows: the LLM's vocabulary when it was added
    visual_prompts: bool = True  # the region encoder: "What color is <region>?" with a box / point / scribble / mask
    region_points: int = 16  # points sampled in a region and pooled (grid_sample) into its embedding
    # the region encoder also pools the frozen ViT's patch features (off by default: models saved before it
    # existed load unchanged; the ShapesWorld recipe turns it on)
    region_patch_features: bool = False
    # the `<region>` embedding is read from the soft-prompt token of the Q-Former query that holds the marked
    # object (`QueryRegionReader`; needs a Q-Former with object heads) instead of a region encoder's own
    # embedding, which a frozen LLM reads badly (off by default: models saved before it load unchanged)
    region_from_queries: bool = False
    num_keypoints: int = 17  # [POSE]: keypoints per person (COCO's 17, as ShapesWorld's stick figures)
    # [POSE]: each keypoint the soft-argmax of a heatmap over a pixel decoder's features (at mask_pixel_stride,
    # mask_pixel_channels wide) instead of regressed from its query's state (off by default: models saved before
    # it load unchanged; the ShapesWorld recipe turns it on)
    pose_heatmaps: bool = False
    # [GEN] / [EDIT]: the draw head whose generator they use ([GEN]: its mapper and UNet as they are;
    # [EDIT]: its VAE and scheduler, and its UNet to initialise the editing UNet from)
    draw_head: str = "draw"
    edit_guidance_scale: float = 7.5  # [EDIT]: classifier-free guidance on the instruction (InstructPix2Pix's s_T)
    edit_image_guidance_scale: float = 1.5  # [EDIT]: guidance on the source image (s_I)
    edit_condition_dropout: float = 0.05  # [EDIT] training: drop the instruction / the image / both, 5 % each
    edit_num_inference_steps: int | None = None  # [EDIT]: DDIM steps; None: the draw head's
    # [EDIT]: the UNet predicts a correction to the source latent (x0-space, starts as an exact copy) instead of
    # InstructPix2Pix's ε; only the instruction is guided then (edit_image_guidance_scale must be 1). Off by
    # default: models saved before it load unchanged.
    edit_source_residual: bool = False

    @property
    def routes(self) -> dict[str, list[str]]:
        """`[DET]` -> `[DET_Q0]`…: each task's routing token and its super-link queries (a shared table:
        `[ACT_Q0]`… after every routing token)."""
        routes = {}
        for task in self.tasks:
            n = self.queries_per_generation_task if task in ("gen", "edit") else self.queries_per_task
            prefix = "ACT" if self.shared_queries else task.upper()
            routes[f"[{task.upper()}]"] = [f"[{prefix}_Q{i}]" for i in range(n)]
        return routes

    @property
    def components(self) -> dict[str, bool]:
        """`decoders` (the DETR decoder of [DET] / [SEG] / [GRD]), `pose_decoder` ([POSE]), `editor` ([EDIT]:
        the editing UNet and its mapper), `region_encoder`. [GEN] has none: it uses the draw head's."""
        perception = any(t in ("det", "seg", "grd") for t in self.tasks)
        return {**({f"{self.name}.decoders": True} if perception else {}),
                **({f"{self.name}.text_encoder": False} if perception and self.text_encoder else {}),
                **({f"{self.name}.pose_decoder": True} if "pose" in self.tasks else {}),
                **({f"{self.name}.editor": True} if "edit" in self.tasks else {}),
                **({f"{self.name}.region_encoder": True} if self.visual_prompts else {})}

    @property
    def region_token(self) -> str | None:
        return "<region>" if self.visual_prompts else None

    def for_model(self, model_config) -> ActConfig:
        if self.selection_attributes and self.selection_vocab_size is None:  # the rows its word embeddings have
            return dataclasses.replace(self, selection_vocab_size=model_config.text_config.vocab_size)
        return self

    def validate(self) -> None:
        super().validate()
        unknown = [t for t in self.tasks if t not in ACT_ROUTES]
        if unknown:
            raise ValueError(f"act: unknown task(s) {unknown}; known: {list(ACT_ROUTES)}")
        if self.queries_per_task < 1 or self.queries_per_generation_task < 1:
            raise ValueError("act: queries per task must be >= 1")
        if self.decoder_hidden_size % self.decoder_heads:
            raise ValueError("act: decoder_hidden_size must be a multiple of decoder_heads")
        if not 0 < self.score_threshold < 1:
            raise ValueError("act: score_threshold must be in (0, 1)")
        if self.num_keypoints < 1:
            raise ValueError("act: num_keypoints must be >= 1")
        if not 0.0 <= self.edit_condition_dropout < 1 / 3:
            raise ValueError("act: edit_condition_dropout must be in [0, 1/3) (three drops of that rate each)")
        if self.edit_guidance_scale < 1 or self.edit_image_guidance_scale < 1:
            raise ValueError("act: edit guidance scales must be >= 1 (1 = no guidance)")
        if self.edit_source_residual and self.edit_image_guidance_scale != 1:
            raise ValueError("act: edit_source_residual never drops the source image, so there is no image "
                             "guidance to apply: set edit_image_guidance_scale to 1")
        if self.edit_num_inference_steps is not None and self.edit_num_inference_steps < 1:
            raise ValueError("act: edit_num_inference_steps must be >= 1")


def build_head_config(name: str, raw: dict) -> HeadConfig:
    """A stored `{"kind": ..., ...}` dict -> its validated, typed config."""
    raw = dict(raw)
    kind = raw.pop("kind", None)
    if kind not in HEAD_CONFIGS:
        raise ValueError(f"head {name!r}: unknown kind {kind!r}; known kinds: {sorted(HEAD_CONFIGS)}")
    cls = HEAD_CONFIGS[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"head {name!r} ({kind}): unknown setting(s) {unknown}; known: {sorted(fields)}")
    raw.setdefault("name", name)
    if raw["name"] != name:
        raise ValueError(f"head {name!r}: its config says name {raw['name']!r}")
    config = cls(**raw)
    if isinstance(config.__dict__.get("mapper_layers"), list):
        config.mapper_layers = tuple(config.mapper_layers)
    config.validate()
    return config
