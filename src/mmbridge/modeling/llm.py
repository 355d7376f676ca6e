"""The frozen causal LM, wrapped with what the bridges need from it.

- `embed`: token embeddings where image placeholders become zero rows (filled by the model later).
- `add_special_tokens`: new tokens (MiniGPT-5 vokens, VisionLLM v2 routing tokens) whose embedding
  rows alone train. The rows are made trainable with peft's `TrainableTokens` layer, which keeps the
  frozen matrix untouched and stores only the new rows.
- `add_lora`: LoRA adapters (peft) on the frozen LLM; the base weights stay untouched.
- `hidden_states_at`: the last hidden state at chosen positions (voken / super-link query outputs).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, TrainableTokensConfig, inject_adapter_in_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from mmbridge.config import MMBridgeConfig

ADAPTER_NAME = "added_tokens"
LORA_ADAPTER_NAME = "lora"


def _canonical_strides(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of the LM head: hand it its input with canonical strides.

    `generate` asks the LM for the last position's logits only, and transformers slices
    `hidden_states[:, -1:, :]`: shape (B, 1, K) with the stride of the full sequence. With a frozen
    (requires_grad=False) bf16 weight, PyTorch 2.13's CPU `linear` sends that input through a batched
    matmul that first copies the transposed weight — 1.2 s instead of 18 ms for a 32k x 2048 head at batch 1,
    10.8 s instead of 20 ms at batch 8 (fp32 at batch 8: 162 vs 77 ms). A contiguous copy (B > 1) or a
    re-view (B = 1) of the same values takes the plain GEMM."""
    hidden = args[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 3:
        return None
    return (hidden.contiguous().view(-1, hidden.shape[-1]).view(hidden.shape), *args[1:])


class LanguageModel(nn.Module):
    def __init__(self, config: MMBridgeConfig, model: PreTrainedModel | None = None):
        super().__init__()
        self.model = model if model is not None else AutoModelForCausalLM.from_config(config.text_config)
        if config.added_tokens:
            self._make_rows_trainable(sorted(config.added_tokens.values()))
        if config.llm_lora:
            self._inject_lora(config.llm_lora)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def hook_output_layer(self) -> None:
        """Give the current LM head (it changes when tokens are added or adapters wrapped or merged) the
        `_canonical_strides` pre-hook, once."""
        layer = self.model.get_output_embeddings()
        if layer is not None and not getattr(layer, "_mmbridge_canonical_strides", False):
            layer.register_forward_pre_hook(_canonical_strides)
            layer._mmbridge_canonical_strides = True

    @property
    def has_adapters(self) -> bool:
        """Whether peft layers (LoRA, trainable token rows) wrap some of the LLM's layers."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(isinstance(m, BaseTunerLayer) for m in self.model.modules())

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    def embed(self, input_ids: torch.Tensor, placeholder_id: int | None = None) -> torch.Tensor:
        """Token embeddings; placeholder positions (not in the LM's vocabulary) become zeros."""
        if placeholder_id is None:
            return self.model.get_input_embeddings()(input_ids)
        is_placeholder = input_ids == placeholder_id
        embeds = self.model.get_input_embeddings()(input_ids.masked_fill(is_placeholder, 0))
        return embeds.masked_fill(is_placeholder.unsqueeze(-1), 0.0)

    def forward(self, **kwargs):
        return self.model(**kwargs)

    def hidden_states_at(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Gather `hidden_states[b, positions[b, k]]` -> (batch, k, hidden)."""
        index = positions.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
        return hidden_states.gather(1, index)

    def add_special_tokens(self, tokens: list[str], tokenizer, config: MMBridgeConfig) -> dict[str, int]:
        """Add `tokens` to tokenizer and LM; new rows start at the mean embedding (MiniGPT-5) and train alone.

        May be called again in a later stage (vokens first, routing tokens later): rows added before keep
        their trained values and keep training. Returns token -> id of every added token and records it in
        `config.added_tokens` so that a saved model rebuilds the same layout.
        """
        new = [t for t in dict.fromkeys(tokens) if t not in (config.added_tokens or {})]
        if not new:
            return dict(config.added_tokens)
        self._fold_trained_rows()
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
        ids = tokenizer.convert_tokens_to_ids(new)
        known_rows = min([*(config.added_tokens or {}).values(), *ids])  # rows of the LM as pretrained
        if max(ids) >= self.vocab_size:
            # pad to a multiple of 8 like most released LMs; the spare rows are never produced by the tokenizer
            self.model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=False)
        with torch.no_grad():
            for matrix in self._token_matrices():
                matrix[ids] = matrix[:known_rows].mean(dim=0)
        config.text_config.vocab_size = self.vocab_size
        config.added_tokens = {**(config.added_tokens or {}), **dict(zip(new, ids))}
        self._make_rows_trainable(sorted(config.added_tokens.values()))
        return dict(config.added_tokens)

    def _fold_trained_rows(self) -> None:
        """Remove the trainable-rows adapter, writing its trained rows into the matrices it wraps (rows of
        added tokens only, which no pretrained weight holds), so the vocabulary can grow and be re-wrapped."""
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

        input_layer, output_layer = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        for layer, setter in ((input_layer, self.model.set_input_embeddings),
                              (output_layer, self.model.set_output_embeddings)):
            if not isinstance(layer, TrainableTokensLayer):
                continue
            base = layer.get_base_layer()
            with torch.no_grad():
                for adapter, indices in layer.token_indices.items():
                    base.weight[indices] = layer.trainable_tokens_delta[adapter].to(base.weight.dtype)
            setter(base)
        peft_configs = getattr(self.model, "peft_config", {})
        peft_configs.pop(ADAPTER_NAME, None)  # re-injected below with every added row
        if not peft_configs and hasattr(self.model, "peft_config"):
            del self.model.peft_config

    def add_lora(self, lora: dict, config: MMBridgeConfig) -> None:
        """Wrap the LLM's linear layers named in `lora["target_modules"]` with LoRA adapters (peft).

        Records the arguments in `config.llm_lora`, so a saved model rebuilds the adapters on load."""
        if config.llm_lora:
            raise ValueError(f"this model's LLM already has LoRA adapters ({config.llm_lora})")
        self._inject_lora(lora)
        config.llm_lora = dict(lora)

    def _inject_lora(self, lora: dict) -> None:
        try:
            peft_config = LoraConfig(**lora)
        except TypeError as error:
            raise ValueError(f"invalid LoRA settings {lora}: {error}") from None
        _inject(peft_config, self.model, LORA_ADAPTER_NAME)

    def _token_matrices(self) -> list[torch.Tensor]:
        matrices = [self.model.get_input_embeddings().weight]
        output = self.model.get_output_embeddings()
        if output is not None and output.weight is not matrices[0]:
            matrices.append(output.weight)
        return matrices

    def _target_module_names(self) -> list[str]:
        names = {module: name for name, module in self.model.named_modules()}
        targets = [names[self.model.get_input_embeddings()]]
        output = self.model.get_output_embeddings()
        if output is not None and output.weight is not self.model.get_input_embeddings().weight:
            targets.append(names[output])
        return targets

    def _make_rows_trainable(self, token_ids: list[int]) -> None:
        peft_config = TrainableTokensConfig(token_indices=token_ids, target_modules=self._target_module_names())
        _inject(peft_config, self.model, ADAPTER_NAME)


def _inject(peft_config, model: nn.Module, name: str) -> None:
    """peft's `inject_adapter_in_model`, without its warning that a second adapter joins the first: an LLM
    here carries two on purpose (LoRA, and the trainable rows of the added tokens), each under its own name."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(peft_config, model, adapter_name=name)


def merge_adapters_(module: nn.Module) -> int:
    """Merge peft adapters (LoRA, trainable token rows) into the weights they wrap and put the plain layers
    back, in place; returns how many. Unmerged, every decode step runs each LoRA's two extra matmuls, and a
    trainable-rows layer copies its whole matrix (embedding, LM head) to splice its rows in. The merged
    model computes the same; saved and loaded again it gets fresh adapters that add nothing (LoRA B = 0,
    token rows read from the merged matrix)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    done: list[str] = []
    for name, layer in list(module.named_modules()):
        if not isinstance(layer, BaseTunerLayer) or any(name.startswith(d + ".") for d in done):
            continue
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
        done.append(name)
    return len(done)
