"""Export an mmbridge see-model as a standard transformers model dir (the inverse of `interop/blip2.py`).

`export_blip2(model_dir, out)` writes `Blip2ForConditionalGeneration` — or
`InstructBlipForConditionalGeneration` when the Q-Former reads the instruction
(`config.qformer_instruction`) — with its processor and tokenizer, so `from_pretrained` loads it and
engines that serve those classes (vLLM, TGI, SGLang) serve it. The weights are renamed, not changed:

    vision.model.*                  -> vision_model.*
    qformer.query_tokens            -> query_tokens
    qformer.model.*                 -> qformer.*            (BLIP-2)
    qformer.model.layernorm.*       -> qformer.embeddings.layernorm.*   (InstructBLIP: the LayerNorm over
    qformer.model.encoder.*         -> qformer.encoder.*                 queries + instruction)
    qformer.text.embeddings.*       -> qformer.embeddings.*             (InstructBLIP's instruction embeddings)
    projection.*                    -> language_projection.*
    llm.model.*                     -> language_model.*     (LoRA merged, added-token rows folded in)

What those classes cannot hold is refused with every reason at once (a vision tower that is not a
BLIP-2 ViT, a vision feature layer other than the last, unmerged LoRA adapters) or, when it is not
part of answering (output heads, BLIP-2's stage-1 ITC/ITM/ITG heads), left out and named in
`summary["left_out"]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmbridge.interop.convert import module_layout

#: Vision towers that `Blip2VisionModel` / `InstructBlipVisionModel` hold exactly (same modules, same names).
BLIP_VISION_TYPES = ("blip_2_vision_model", "instructblip_vision_model")


class ExportError(ValueError):
    """The model cannot be expressed in the requested transformers class; the message says why."""


@dataclass
class ExportPlan:
    target: str  # "blip2" or "instructblip"
    problems: list[str] = field(default_factory=list)  # blocking
    left_out: list[str] = field(default_factory=list)  # dropped, named in the summary
    notes: list[str] = field(default_factory=list)  # what the user must know to run the export

    @property
    def class_name(self) -> str:
        return {"blip2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration"}[
            self.target]


# -- checking ---------------------------------------------------------------------------------
def check_model_dir(directory: str | Path) -> Path:
    """Every JSON and safetensors file of an mmbridge model dir must parse; a bad one is named in one line."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json; is it an mmbridge model directory?")
    return check_files(directory)


def check_files(directory: Path) -> Path:
    """Every `*.json` and `*.safetensors` file directly in `directory` parses; else one line naming it."""
    for path in sorted(directory.glob("*.json")):
        try:
            json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ExportError(f"{path} is corrupt: not valid JSON ({err})") from None
    for path in sorted(directory.glob("*.safetensors")):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    handle.get_slice(key).get_shape()
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ExportError(f"{path} is corrupt: not a readable safetensors file ({reason})") from None
    return directory


def plan_export(config, merge_lora: bool = False) -> ExportPlan:
    """What exporting a model with this `MMBridgeConfig` does: the target class, or why it cannot."""
    plan = ExportPlan("instructblip" if config.qformer_instruction else "blip2")
    vision_type = config.vision_config.model_type
    if vision_type not in BLIP_VISION_TYPES:
        detail = ""
        if vision_type == "clip_vision_model":
            detail = (" (CLIP applies a LayerNorm before its encoder (`pre_layrnorm`) and returns its last hidden "
                      "state without `post_layernorm`, while the BLIP-2 ViT has no pre-encoder LayerNorm and "
                      "applies `post_layernorm` to every token; no renaming or folding of weights turns one into "
                      "the other, as a LayerNorm is not linear)")
        plan.problems.append(
            f"its vision encoder is {vision_type!r}, but {plan.class_name} holds only a BLIP-2 ViT "
            f"({' / '.join(BLIP_VISION_TYPES)}){detail}")
    if config.vision_feature_layer is not None or config.drop_cls_token:
        plan.problems.append(
            f"its Q-Former reads vision layer {config.vision_feature_layer} (drop_cls_token={config.drop_cls_token}), "
            "but BLIP-2 always feeds the vision encoder's last_hidden_state, CLS token included")
    if config.projection_norm:
        plan.problems.append(
            "its projection ends in an RMS normalisation to the LLM's embedding scale (projection_norm), but "
            f"{plan.class_name}'s language_projection is one linear layer; a normalisation is not linear, so it "
            "cannot be folded into it")
    if config.llm_lora:
        if merge_lora:
            plan.notes.append(f"LoRA adapters (r={config.llm_lora.get('r')}) merged into the exported LLM weights "
                              "(peft merge_and_unload semantics)")
        else:
            plan.problems.append(
                f"its LLM carries LoRA adapters (r={config.llm_lora.get('r')}) that {plan.class_name} cannot hold; "
                "re-run with --merge-lora to merge them into the exported LLM weights")
    if config.image_text_hidden_size:
        if plan.target == "instructblip":
            parts = "ITC projections, ITM head, ITG LM head; its text embeddings and feed-forwards read the instruction"
            parts += " and are kept"
        else:
            parts = "ITC projections, ITM head, ITG LM head, text embeddings and text feed-forwards"
        plan.left_out.append(f"the Q-Former's stage-1 heads ({parts}): used in training only")
    for name, head in config.head_configs.items():
        frozen = "".join(f"; {part} stays at {path}" for part, path in head.component_paths.items())
        plan.left_out.append(
            f"output head {name!r} (kind {head.kind!r}; components {list(head.components)}; losses "
            f"{list(head.loss_names)}{frozen}): transformers' class has no head hook. Its tokens {head.tokens} "
            "stay in the vocabulary, so the exported model may write them as plain text; serve the head with mmbridge")
    return plan


# -- weights ----------------------------------------------------------------------------------
def merge_llm_adapters(model) -> None:
    """Fold peft layers of the LLM into its plain weights, in place: LoRA (`W + B A * scale`, peft's
    `merge_and_unload`) and the trainable rows of added tokens. The LLM is left without peft modules."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    llm = model.llm.model
    tuner_names = [name for name, module in llm.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in tuner_names:
        parent_name, _, child = name.rpartition(".")
        parent = llm.get_submodule(parent_name) if parent_name else llm
        layer = getattr(parent, child)
        with torch.no_grad():
            layer.merge(safe_merge=True)
        setattr(parent, child, layer.get_base_layer())
    if hasattr(llm, "peft_config"):
        del llm.peft_config


def _hf_config(config, plan: ExportPlan, vocab_size: int):
    from transformers import Blip2Config, InstructBlipConfig

    text = config.text_config.to_dict()
    text["vocab_size"] = vocab_size
    vision = {k: v for k, v in config.vision_config.to_dict().items() if k != "model_type"}
    qformer = {k: v for k, v in config.qformer_config.to_dict().items() if k != "model_type"}
    qformer["encoder_hidden_size"] = config.vision_config.hidden_size
    common = dict(text_config=text, num_query_tokens=config.num_query_tokens,
                  image_token_index=config.image_token_index)
    if plan.target == "blip2":
        qformer["use_qformer_text_input"] = False  # queries only: the text feed-forwards are not exported
        return Blip2Config(vision_config=vision, qformer_config=qformer, **common)
    qformer.pop("use_qformer_text_input", None)
    return InstructBlipConfig(vision_config=vision, qformer_config=qformer, **common)


def _target_layout(hf_config, plan: ExportPlan) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    cls = Blip2ForConditionalGeneration if plan.target == "blip2" else InstructBlipForConditionalGeneration
    return module_layout(cls, hf_config)


def export_key(key: str, target: str) -> str | None:
    """mmbridge key -> key of the exported class (None: not exported)."""
    if key.startswith("vision.model."):
        return "vision_model." + key[len("vision.model."):]
    if key == "qformer.query_tokens":
        return "query_tokens"
    if key.startswith("projection."):
        return "language_projection." + key[len("projection."):]
    if key.startswith("llm.model."):
        return "language_model." + key[len("llm.model."):]
    if target == "blip2":
        if key.startswith("qformer.model."):
            return "qformer." + key[len("qformer.model."):]
        return None
    if key.startswith("qformer.model.layernorm."):
        return "qformer.embeddings.layernorm." + key[len("qformer.model.layernorm."):]
    if key.startswith("qformer.model.encoder."):
        return "qformer.encoder." + key[len("qformer.model.encoder."):]
    for part in ("word_embeddings", "position_embeddings"):
        if key.startswith(f"qformer.text.embeddings.{part}."):
            return f"qformer.embeddings.{part}." + key.rsplit(".", 1)[1]
    return None


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    extra = torch.zeros(rows - tensor.shape[0], *tensor.shape[1:], dtype=tensor.dtype)
    return torch.cat([tensor, extra])


# -- processor --------------------------------------------------------------------------------
#: The placeholder Blip2Processor / InstructBlipProcessor write (transformers 5 reads no other: a tokenizer's
#: own `image_token` comes back as a str, which these processors cannot use).
HF_IMAGE_TOKEN = "<image>"


def _template_adds_bos_after_image(processor) -> bool:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    text = processor.render(messages, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    return bool(bos) and text.replace(processor.image_token, "").startswith(bos)


def _rename_token(directory: Path, old: str, new: str, token_id: int) -> None:
    """Give token `token_id` the text `new` in a saved fast tokenizer (same id, so the weights do not change)."""
    if old == new:
        return
    tokenizer_file, config_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
    data = json.loads(tokenizer_file.read_text())
    vocab = data.get("model", {}).get("vocab")
    taken = [t["id"] for t in data.get("added_tokens", []) if t["content"] == new]
    if (isinstance(vocab, dict) and new in vocab) or taken:
        raise ExportError(f"the tokenizer already has a {new!r} token, so the image placeholder {old!r} "
                          f"(id {token_id}) cannot take that name, which BLIP-2's processor needs")
    for token in data.get("added_tokens", []):
        if token["id"] == token_id:
            token["content"] = new
    if isinstance(vocab, dict) and old in vocab:
        vocab[new] = vocab.pop(old)
    tokenizer_file.write_text(json.dumps(data, ensure_ascii=False))
    settings = json.loads(config_file.read_text())
    for key, value in list(settings.items()):
        if value == old:
            settings[key] = new
        elif isinstance(value, list):
            settings[key] = [new if v == old else v for v in value]
    config_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False))


def _export_processor(processor, plan: ExportPlan, out: Path) -> None:
    """Blip2Processor / InstructBlipProcessor over the model's own tokenizer and image processor."""
    import tempfile

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer, Blip2Processor, InstructBlipProcessor

    with tempfile.TemporaryDirectory() as tmp:
        processor.tokenizer.save_pretrained(tmp)
        _rename_token(Path(tmp), processor.image_token, HF_IMAGE_TOKEN, processor.image_token_id)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        tokenizer.padding_side = "left"  # batched generation, as mmbridge pads
        if _template_adds_bos_after_image(processor) and tokenizer("a")["input_ids"][:1] != [tokenizer.bos_token_id]:
            # BLIP-2's layout is image tokens, BOS, text: the processor relies on the tokenizer for the BOS.
            bos = tokenizer.bos_token
            tokenizer._tokenizer.post_processor = TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)])
        if plan.target == "blip2":
            hf = Blip2Processor(processor.image_processor, tokenizer, num_query_tokens=processor.num_query_tokens)
        else:
            # mmbridge's Q-Former text is CLS + instruction + EOS in the model's own vocabulary.
            qformer_tokenizer = AutoTokenizer.from_pretrained(tmp)
            cls_token = qformer_tokenizer.convert_ids_to_tokens(processor.qformer_cls_token_id)
            eos = qformer_tokenizer.eos_token
            qformer_tokenizer._tokenizer.post_processor = TemplateProcessing(
                single=f"{cls_token} $A {eos}",
                special_tokens=[(cls_token, processor.qformer_cls_token_id), (eos, qformer_tokenizer.eos_token_id)])
            qformer_tokenizer.model_max_length = processor.qformer_max_length
            hf = InstructBlipProcessor(processor.image_processor, tokenizer, qformer_tokenizer,
                                       num_query_tokens=processor.num_query_tokens)
        # mmbridge's chat template renders the image placeholder itself, while these processors prepend the
        # image tokens to any text: kept aside (for prompts built by hand), not as the processor's template.
        hf.chat_template = None
        for tok in (hf.tokenizer, getattr(hf, "qformer_tokenizer", None)):
            if tok is not None:
                tok.chat_template = None
        hf.save_pretrained(out)
    (out / "mmbridge_chat_template.jinja").write_text(processor.chat_template.replace(processor.image_token,
                                                                                       HF_IMAGE_TOKEN))


# -- the export -------------------------------------------------------------------------------
def export_blip2(model_dir: str | Path, out: str | Path, merge_lora: bool = False,
                 dtype: torch.dtype | None = None) -> dict:
    """Write `out` as a transformers BLIP-2 / InstructBLIP dir; returns a summary (class, keys, bytes,
    left_out, notes). Raises `ExportError` naming every reason the model does not fit the class."""
    from transformers import GenerationConfig

    from mmbridge.config import MMBridgeConfig
    from mmbridge.interop.loading import ShardWriter
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.processing import MMBridgeProcessor

    model_dir = check_model_dir(model_dir)
    config = MMBridgeConfig.from_pretrained(model_dir)
    for name, component in config.component_paths.items():  # frozen parts referenced by path (mmbridge build)
        if name in ("vision", "llm"):
            check_model_dir(component)
        elif Path(component).is_dir():  # a head's frozen part (e.g. a diffusers folder): its files only
            check_files(Path(component))
    plan = plan_export(config, merge_lora=merge_lora)
    if plan.problems:
        reasons = "; ".join(f"({i}) {p}" for i, p in enumerate(plan.problems, 1))
        raise ExportError(f"{model_dir} cannot be exported as {plan.class_name}: {reasons}")
    if plan.target == "instructblip" and config.qformer_cls_token_id is None:
        raise ExportError(f"{model_dir}: an instruction-aware Q-Former needs config.qformer_cls_token_id")

    try:
        model = MMBridgeModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    except Exception as err:
        from mmbridge.interop.loading import explain_load_error

        line = explain_load_error(model_dir, err)
        if line is None:
            raise
        raise ExportError(line) from None
    processor = MMBridgeProcessor.from_pretrained(model_dir)
    merge_llm_adapters(model)
    vocab_size = model.llm.vocab_size
    image_token_index = config.image_token_index
    if image_token_index is not None and image_token_index >= vocab_size:
        # HF embeds input_ids before placing the image features, so the placeholder needs a row.
        plan.notes.append(f"the LLM vocabulary grew from {vocab_size} to {image_token_index + 1} rows so that the "
                          f"image token {processor.image_token!r} (id {image_token_index}) has an embedding; the new "
                          "rows are zero and suppressed in generation_config.json")
        vocab_size = image_token_index + 1
    hf_config = _hf_config(model.config, plan, vocab_size)
    expected, aliases = _target_layout(hf_config, plan)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, dtype=dtype)
    dropped: list[str] = []
    head_prefixes = tuple(f"{name}." for name in model.head_names)
    for key, tensor in model.state_dict().items():
        target = export_key(key, plan.target)
        if target is None or target not in expected:
            if not key.startswith(head_prefixes) and not key.startswith("qformer."):
                raise ExportError(f"{key} has no place in {plan.class_name}")
            dropped.append(key)
            continue
        if target in aliases:
            continue  # a tied lm_head: stored once, re-tied by transformers on load
        tensor = tensor.detach()
        if tensor.shape[0] != expected[target][0] and target.startswith("language_model."):
            tensor = _padded_rows(tensor, expected[target][0])
        if tuple(tensor.shape) != expected[target]:
            raise ExportError(f"{key} -> {target}: shape {tuple(tensor.shape)} vs {expected[target]}")
        writer.add(target, tensor)
    if not config.projection_bias:
        writer.add("language_projection.bias", torch.zeros(expected["language_projection.bias"]))
    written = set(writer.close())
    missing = sorted(set(expected) - written - aliases)
    if missing:
        raise ExportError(f"no weights for {len(missing)} key(s) of {plan.class_name}, e.g. {missing[:5]}")

    hf_config.architectures = [plan.class_name]
    if dtype is not None:
        hf_config.dtype = dtype
    hf_config.save_pretrained(out)
    text = config.text_config
    generation = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
                                  pad_token_id=processor.tokenizer.pad_token_id)
    if image_token_index is not None and image_token_index >= model.llm.vocab_size:
        generation.suppress_tokens = list(range(model.llm.vocab_size, vocab_size))
    generation.save_pretrained(out)
    _export_processor(processor, plan, out)
    if processor.stop_strings:
        plan.notes.append(f"stop strings {processor.stop_strings} are not part of the transformers config: pass "
                          "them to generate (stop_strings=..., tokenizer=...) or to the server (stop=[...])")
    if processor.image_token != HF_IMAGE_TOKEN:
        plan.notes.append(f"the image placeholder {processor.image_token!r} is named {HF_IMAGE_TOKEN!r} in the "
                          f"exported tokenizer (same id, {image_token_index}), as BLIP-2's processor requires")
    plan.notes.append("the processor puts the image first (BLIP-2's layout); mmbridge's chat template is kept in "
                      "mmbridge_chat_template.jinja for building prompts that place it elsewhere")
    summary = {"class": plan.class_name, "keys": len(written), "bytes": writer.total_bytes,
               "left_out": plan.left_out, "dropped_keys": len(dropped), "notes": plan.notes}
    (out / "mmbridge_export.json").write_text(json.dumps({"source": str(model_dir), **summary}, indent=2) + "\n")
    return summary
