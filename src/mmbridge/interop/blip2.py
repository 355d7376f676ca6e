"""Import an HF `Blip2ForConditionalGeneration` dir (e.g. Salesforce/blip2-opt-2.7b) as an mmbridge model.

BLIP-2 and mmbridge compute the same thing (vision `last_hidden_state` -> Q-Former with learned
queries, LayerNorm on the queries -> linear projection -> soft prompt at the image-token positions of
a causal LM), so the import is a pure renaming of weights:

    vision_model.*         -> vision.model.*
    query_tokens           -> qformer.query_tokens
    qformer.*              -> qformer.model.*
    language_projection.*  -> projection.*
    language_model.*       -> llm.model.*

The prompt layout follows HF's `Blip2Processor`: the image's query tokens first, then BOS, then the
text ("Question: … Answer:"), so the same token ids reach both models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmbridge.interop.loading import iter_tensors

KEY_MAP = (
    ("vision_model.", "vision.model."),
    ("query_tokens", "qformer.query_tokens"),
    ("qformer.", "qformer.model."),
    ("language_projection.", "projection."),
    ("language_model.", "llm.model."),
)
DEFAULT_IMAGE_TOKEN = "<image>"

# BLIP-2 is not a chat model: each user turn is "<image tokens><bos>{text}", an answer follows with a
# leading space and ends in EOS. __IMAGE__ is replaced by the checkpoint's image token.
BLIP2_TEMPLATE = """{#- BLIP-2 (HF Blip2Processor layout): image tokens, BOS, then the text,
    e.g. "Question: … Answer:". -#}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{{ message.content[0].text if message.content is not string else message.content }}
{%- elif message.role == 'user' -%}
{%- for part in message.content if part.type == 'image' -%}__IMAGE__{%- endfor -%}
{{ bos_token }}
{%- for part in message.content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- elif message.role == 'assistant' -%}
{% generation %} {% for part in message.content %}{{ part.text }}{% endfor %}{{ eos_token }}{% endgeneration %}
{%- endif -%}
{%- endfor -%}
"""


def map_key(key: str) -> str | None:
    """BLIP-2 key -> mmbridge key (None: not part of the model, e.g. BLIP-2's text-side heads)."""
    for old, new in KEY_MAP:
        if key == old or key.startswith(old):
            return new + key[len(old):]
    return None


def load_blip2_config(src: str | Path):
    from transformers import AutoConfig

    src = Path(src)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not an HF model dir (no config.json)")
    config = AutoConfig.from_pretrained(src)
    if config.model_type != "blip-2":
        raise ValueError(f"{src} holds a {config.model_type!r} model, not BLIP-2 ('blip-2')")
    return config


def mmbridge_config(blip2_config, image_token_index: int, **overrides):
    """The `MMBridgeConfig` that computes what `blip2_config` computes."""
    from mmbridge.config import MMBridgeConfig

    return MMBridgeConfig(
        vision_config=blip2_config.vision_config.to_dict(),
        qformer_config=blip2_config.qformer_config.to_dict(),
        text_config=blip2_config.text_config.to_dict(),
        num_query_tokens=blip2_config.num_query_tokens,
        vision_feature_layer=None,  # BLIP-2 feeds the encoder's last_hidden_state (after post_layernorm)
        drop_cls_token=False,  # ... CLS token included
        projection_bias=True,
        image_token_index=image_token_index,
        **overrides,
    )


def load_image_processor(directory: Path, image_size: int):
    """BLIP-2's own preprocessing config when the dir has one, else BLIP-2's defaults at `image_size`."""
    from transformers import BlipImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    if (directory / "preprocessor_config.json").is_file():
        return BlipImageProcessorPil.from_pretrained(directory)
    return BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                 image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)


def import_blip2(src: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                 tokenizer_dir: str | Path | None = None) -> dict:
    """Convert the BLIP-2 dir `src` into the mmbridge model dir `out`; returns a summary."""
    from transformers import AutoTokenizer

    from mmbridge.interop.convert import write_model_dir
    from mmbridge.processing import MMBridgeProcessor

    src = Path(src)
    blip2_config = load_blip2_config(src)
    if not blip2_config.use_decoder_only_language_model:
        raise ValueError(
            f"{src} pairs BLIP-2 with an encoder-decoder LM ({blip2_config.text_config.model_type}); mmbridge composes "
            "causal LMs only. Use `mmbridge import minigpt4` or `mmbridge build --qformer` to reuse its vision "
            "encoder and Q-Former with a causal LM.")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or src)
    # Checkpoints converted after transformers 4.47 carry an image token inside the LM vocabulary; older
    # ones prepended the queries instead, which is the same as image tokens placed first in the prompt.
    index = getattr(blip2_config, "image_token_index", None)
    if index is not None and index < len(tokenizer):
        image_token = tokenizer.convert_ids_to_tokens(index)
    else:
        image_token = DEFAULT_IMAGE_TOKEN
    processor = MMBridgeProcessor(
        load_image_processor(src, blip2_config.vision_config.image_size), tokenizer,
        chat_template=BLIP2_TEMPLATE.replace("__IMAGE__", image_token),
        num_query_tokens=blip2_config.num_query_tokens, image_token=image_token, stop_strings=[])
    config = mmbridge_config(blip2_config, processor.image_token_id)

    def tensors():
        for key, tensor in iter_tensors(src):
            new_key = map_key(key)
            if new_key is not None:
                yield new_key, tensor, f"{src.name}/{key}"

    return write_model_dir(out, config, processor, tensors(), dtype=dtype)
