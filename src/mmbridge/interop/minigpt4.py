"""Import MiniGPT-4's published layout as an mmbridge model.

MiniGPT-4 = BLIP-2's frozen EVA ViT-g + Q-Former (take them from an HF BLIP-2 dir; MiniGPT-4 used the
`blip2_pretrained_flant5xxl` Q-Former, i.e. `Salesforce/blip2-flan-t5-xxl`), a trained `llama_proj`
Linear(768 -> LLM hidden) stored as `{"model": {"llama_proj.weight", "llama_proj.bias"}}` in a
`.pth`, and a frozen Vicuna/Llama dir. Only the BLIP-2 vision and Q-Former tensors are read (the
BLIP-2 dir's own language model is skipped without being loaded). The result uses MiniGPT-4's
template (`###Human: <Img><ImageHere></Img> … ###Assistant: `, with BOS first as MiniGPT-4's
tokenisation adds it) and stops on "###"; only the projection is marked trainable, as in MiniGPT-4.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmbridge.interop.blip2 import load_blip2_config, load_image_processor, map_key
from mmbridge.interop.loading import ShapeMismatchError, hf_component_tensors, iter_tensors, load_state_dict

PROJ_KEYS = ("llama_proj.weight", "llama_proj.bias")
MINIGPT4_TRAINABLE = {"vision": False, "qformer": False, "projection": True, "llm": False}


def load_minigpt4_projection(path: str | Path) -> dict[str, torch.Tensor]:
    """`llama_proj.weight/bias` from a MiniGPT-4 checkpoint (`{"model": {...}}` or a bare state dict)."""
    state = load_state_dict(path)  # .pth through weights_only=True; refuses pickle payloads
    if isinstance(state.get("model"), dict):
        state = state["model"]
    missing = [k for k in PROJ_KEYS if k not in state]
    if missing:
        found = sorted(k for k in state if isinstance(k, str))[:8]
        raise KeyError(f"{path} has no {missing} (MiniGPT-4 checkpoints hold them under 'model'); found {found}")
    return {k: state[k] for k in PROJ_KEYS}


def import_minigpt4(blip2_dir: str | Path, proj_path: str | Path, llm_dir: str | Path, out: str | Path,
                    dtype: torch.dtype | None = None, link_llm: bool = False) -> dict:
    """Write an mmbridge model dir; with `link_llm` the LLM is referenced by path instead of copied."""
    from transformers import AutoConfig, AutoTokenizer

    from mmbridge.config import MMBridgeConfig
    from mmbridge.interop.convert import write_model_dir
    from mmbridge.processing import PRESET_STOP_STRINGS, MMBridgeProcessor, chat_template_preset

    blip2_dir, llm_dir = Path(blip2_dir), Path(llm_dir).resolve()
    blip2_config = load_blip2_config(blip2_dir)
    text_config = AutoConfig.from_pretrained(llm_dir)
    proj = load_minigpt4_projection(proj_path)

    # A projection trained for one LLM width cannot drive another (e.g. 7B's 4096 vs 13B's 5120).
    want = (text_config.hidden_size, blip2_config.qformer_config.hidden_size)
    got = tuple(proj["llama_proj.weight"].shape)
    if got != want:
        raise ShapeMismatchError(
            f"llama_proj.weight in {proj_path} has shape {got}, but the language model in {llm_dir} "
            f"(hidden size {text_config.hidden_size}) with this Q-Former (hidden size "
            f"{blip2_config.qformer_config.hidden_size}) needs {want}; was it trained for a different LLM?")
    if tuple(proj["llama_proj.bias"].shape) != want[:1]:
        raise ShapeMismatchError(f"llama_proj.bias in {proj_path} has shape {tuple(proj['llama_proj.bias'].shape)}, "
                                 f"the model needs {want[:1]}")

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    processor = MMBridgeProcessor(
        load_image_processor(blip2_dir, blip2_config.vision_config.image_size), tokenizer,
        chat_template="{{ bos_token }}" + chat_template_preset("minigpt4"),
        num_query_tokens=blip2_config.num_query_tokens, stop_strings=PRESET_STOP_STRINGS["minigpt4"])
    config = MMBridgeConfig(
        vision_config=blip2_config.vision_config.to_dict(),
        qformer_config=blip2_config.qformer_config.to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=blip2_config.num_query_tokens,
        vision_feature_layer=None,  # MiniGPT-4: ln_vision(visual_encoder(image)) = BLIP-2's last_hidden_state
        image_token_index=processor.image_token_id,
        trainable=MINIGPT4_TRAINABLE,
        component_paths={"llm": str(llm_dir)} if link_llm else None,
    )

    def tensors():
        bridge = ("vision_model.", "qformer.", "query_tokens")
        for key, tensor in iter_tensors(blip2_dir, wanted=lambda k: k.startswith(bridge)):
            yield map_key(key), tensor, f"{blip2_dir.name}/{key}"
        yield "projection.weight", proj["llama_proj.weight"], f"{Path(proj_path).name}/llama_proj.weight"
        yield "projection.bias", proj["llama_proj.bias"], f"{Path(proj_path).name}/llama_proj.bias"
        if not link_llm:
            for key, tensor in hf_component_tensors(llm_dir, "causal_lm", dtype):
                yield f"llm.model.{key}", tensor, f"{llm_dir.name}/{key}"

    return write_model_dir(out, config, processor, tensors(), dtype=dtype)
