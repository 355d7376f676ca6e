"""Decode options (faster batch-1 decoding, mainly on CPU) and the quality check each is judged by.

Batch-1 decoding reads every LLM weight once per token, so its speed is set by the bytes read and by
how close the matrix-vector kernels come to memory bandwidth. The options:

- `dtype=torch.bfloat16` (an argument of `from_pretrained` already): half the bytes; CPUs with
  avx512_bf16 / AMX run bf16 GEMV through oneDNN.
- `quantize="int8"`: int8 weight-only linears in the LLM (`modeling.quantize`; per-output-channel
  scales, PyTorch's CPU kernel `aten._weight_int8pack_mm`); `quantize="int8-g32"`: one scale per 32
  input columns (closer to fp32, a compiled kernel). `MMBridgeModel.from_pretrained(...,
  quantize=...)` quantizes while it reads the stored weights (no float copy of the LLM is ever
  held); here, a loaded model is converted in place (adapters merged first).
- `kv_cache="static"`: a pre-allocated KV cache (transformers `StaticCache`) instead of one that
  grows by concatenation each step; the prerequisite of `compile`.
- `compile=True`: `torch.compile` of the decode step through transformers' generation compile path
  (static cache; on CPU too).
- `merge_adapters=True`: LoRA adapters and trainable token rows merged into the frozen weights, so a
  decode step runs no adapter code (models trained by mmbridge have one or both).

Chat sessions keep a growing cache of their own for KV reuse across turns; the static cache applies
to one-shot and streamed generation (and so to the server). `greedy_agreement` compares a candidate
model with the fp32 reference on fixed prompts; `mmbridge bench` reports it next to each option's speed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmbridge.modeling.llm import merge_adapters_  # noqa: F401
from mmbridge.modeling.quantize import QUANTIZE_CHOICES, Int8WeightOnlyLinear, has_int8, quantize_int8_  # noqa: F401

#: What `greedy_agreement` passes from a processor batch to the models.
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "qformer_input_ids", "qformer_attention_mask")
KV_CACHE_CHOICES = ("dynamic", "static")


def apply_decode_options(model, quantize: str | None = None, kv_cache: str | None = None,
                         compile: bool = False, merge_adapters: bool = False):
    """Apply the options to an `MMBridgeModel` in place (its LLM); returns the model. `quantize` merges
    the adapters first, so that every linear layer is quantized."""
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, not {quantize!r}")
    if merge_adapters:
        merge_adapters_(model.llm.model)
    model._quantize(quantize)  # merges first; nothing to do if it was quantized while loading
    if kv_cache not in (None, *KV_CACHE_CHOICES):
        raise ValueError(f"kv_cache must be one of {KV_CACHE_CHOICES}, not {kv_cache!r}")
    config = model.llm.model.generation_config
    if compile or kv_cache == "static":
        config.cache_implementation = "static"
    if compile:
        from transformers import CompileConfig

        # transformers compiles the decode step only on accelerators unless told otherwise.
        compile_config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        compile_config._compile_all_devices = True
        config.compile_config = compile_config
    elif kv_cache == "static":
        config.disable_compile = True
    return model


def llm_bytes_per_token(language_model: nn.Module) -> int:
    """Bytes of LLM weights a batch-1 decode step reads: every parameter and buffer except the input
    embedding matrix (one row of it is read), unless the output layer shares it."""
    embedding = language_model.get_input_embeddings().weight
    output = language_model.get_output_embeddings()
    tied = output is not None and getattr(output, "weight", None) is not None and \
        output.weight.data_ptr() == embedding.data_ptr()
    total, seen = 0, set()
    for tensor in [*language_model.parameters(), *language_model.buffers()]:
        if tensor is None or tensor.data_ptr() in seen or tensor.dtype in (torch.int64, torch.bool):
            continue
        seen.add(tensor.data_ptr())
        if tensor.data_ptr() == embedding.data_ptr() and not tied:
            continue
        total += tensor.numel() * tensor.element_size()
    return total


# -- quality ------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_agreement(reference, candidate, batches: Sequence[dict], max_new_tokens: int = 16,
                     **candidate_generate_kwargs) -> dict:
    """How closely `candidate` decodes like `reference` (two `MMBridgeModel`s, e.g. fp32 vs an option).

    For every batch of processor outputs (left-padded, generation prompt added) the reference answers
    greedily (up to `max_new_tokens`, its EOS included: the positions after a row's EOS do not count).
    Over the reference's answer tokens:
    - `agreement`: teacher-forced top-1 agreement — the fraction where the candidate's argmax given the
      same prefix is the reference's token (the per-step decision of greedy decoding);
    - `sequence_match`: the fraction where the candidate's own greedy answer has the same token at the
      same position (one early flip changes everything after it, so this is the stricter number);
    - `nll_delta`: mean negative log-likelihood of the reference's tokens under the candidate minus
      under the reference (nats per token; > 0: the candidate finds them less likely).
    `candidate_generate_kwargs` go to the candidate's `generate` (e.g. `cache_implementation="static"`).
    """
    llm_config = reference.llm.model.generation_config
    eos = llm_config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)
    pad = llm_config.pad_token_id if llm_config.pad_token_id is not None else (eos_ids[0].item() if len(eos_ids) else 0)
    # The image placeholder is input-only (as in the pipeline): generated, it would ask for a soft prompt.
    image_token = reference.config.image_token_index
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=[image_token], pad_token_id=pad)
    agree = match = total = 0
    nll_ref = nll_cand = 0.0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS and v is not None}
        ref_new = reference.generate(**inputs, **settings)
        cand_new = candidate.generate(**inputs, **settings, **candidate_generate_kwargs)
        is_eos = torch.isin(ref_new, eos_ids)
        counted = (is_eos.long().cumsum(dim=1) - is_eos.long()) == 0  # up to and including the first EOS
        width = ref_new.shape[1]
        cand_new = torch.nn.functional.pad(cand_new[:, :width], (0, width - min(width, cand_new.shape[1])), value=-1)
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], ref_new], dim=1),
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(ref_new)], dim=1))
        prompt = inputs["input_ids"].shape[1]
        positions = slice(prompt - 1, prompt - 1 + width)
        ref_logits = reference(**full).logits[:, positions].float()
        cand_logits = candidate(**full).logits[:, positions].float()
        ref_logits[..., image_token] = cand_logits[..., image_token] = float("-inf")
        agree += int(((cand_logits.argmax(-1) == ref_new) & counted).sum())
        match += int(((cand_new == ref_new) & counted).sum())
        total += int(counted.sum())
        target = ref_new.unsqueeze(-1)
        nll_ref += float((-ref_logits.log_softmax(-1).gather(-1, target).squeeze(-1) * counted).sum())
        nll_cand += float((-cand_logits.log_softmax(-1).gather(-1, target).squeeze(-1) * counted).sum())
    return {"tokens": total, "agreement": agree / total, "sequence_match": match / total,
            "nll_delta": (nll_cand - nll_ref) / total}


def prompt_batches(processor, images: Sequence, questions: Sequence[str], batch_size: int = 4) -> list[dict]:
    """The fixed prompt set: every image with every question, as left-padded processor batches."""
    conversations, pictures = [], []
    for image in images:
        for question in questions:
            conversations.append([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}])
            pictures.append(image)
    return [dict(processor(conversations[i:i + batch_size], images=pictures[i:i + batch_size],
                           add_generation_prompt=True))
            for i in range(0, len(conversations), batch_size)]
