"""MiniGPT-5's feature mapper: the vokens' LLM hidden states -> the generator's conditioning sequence.

Linear(llm -> d)-GELU-Linear(d -> d), then a transformer encoder-decoder whose decoder reads a learned
query table (77 queries for Stable Diffusion: the length of its text-encoder sequence), then a
projection to the UNet's cross-attention width. Written with torch's `nn.Transformer`, as the seed does.

With `request_window` > 0 (`DrawConfig.mapper_reads_request`) the encoder also reads the request's own
words before the trigger (the LLM's last hidden states there, the model's `head_context`, plus an embedding of
their token ids), each with a learned position: a small frozen LLM passes only part of "a red circle left of a
blue square" on to the eight voken states (docs/recipe.md, runs l2 and m1-m6).
"""

from __future__ import annotations

import torch
from torch import nn


def _projection(llm_hidden_size: int, hidden_size: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(llm_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


class FeatureMapper(nn.Module):
    def __init__(self, llm_hidden_size: int, hidden_size: int, condition_dim: int, num_queries: int,
                 encoder_layers: int, decoder_layers: int, num_heads: int, request_window: int = 0,
                 vocab_size: int = 0):
        super().__init__()
        self.mlp = _projection(llm_hidden_size, hidden_size)
        self.transformer = nn.Transformer(d_model=hidden_size, nhead=num_heads, num_encoder_layers=encoder_layers,
                                          num_decoder_layers=decoder_layers, dim_feedforward=4 * hidden_size,
                                          dropout=0.0, batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.out = nn.Linear(hidden_size, condition_dim)
        self.request_window = request_window
        if request_window:
            self.request_mlp = _projection(llm_hidden_size, hidden_size)
            self.request_positions = nn.Parameter(torch.randn(1, request_window, hidden_size) * 0.02)
            # the words themselves too: a small frozen LLM's last states say more about the next word than
            # about their own (the act head's attribute selection reads the ids for the same reason)
            self.request_tokens = nn.Embedding(vocab_size, hidden_size) if vocab_size else None

    def forward(self, voken_hidden: torch.Tensor, request_states: torch.Tensor | None = None,
                request_mask: torch.Tensor | None = None, request_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(n, num_vokens, llm_hidden) -> (n, num_queries, condition_dim); a mapper built with a request
        window also needs the request's words, (n, window, llm_hidden) with their (n, window) mask (True: a
        real token), and reads their (n, window) token ids when it was built with a vocabulary."""
        memory = self.mlp(voken_hidden.to(self.out.weight.dtype))
        padding = None
        if self.request_window:
            if request_states is None:
                raise ValueError("this draw mapper reads the request's words (mapper_reads_request): pass "
                                 "request_states, the LLM's hidden states before the trigger")
            window = request_states.shape[1]
            if window > self.request_window:
                raise ValueError(f"draw mapper: a request window of {window} tokens, built for at most "
                                 f"{self.request_window}")
            words = self.request_mlp(request_states.to(memory.dtype)) + self.request_positions[:, -window:]
            mask = torch.ones(words.shape[:2], dtype=torch.bool, device=words.device) if request_mask is None \
                else request_mask.bool()
            if self.request_tokens is not None and request_ids is not None:
                known = request_ids < self.request_tokens.num_embeddings  # tokens added after the mapper was built
                words = words + self.request_tokens(request_ids.clamp(max=self.request_tokens.num_embeddings - 1)) \
                    * known[..., None]
            memory = torch.cat([memory, words], dim=1)
            vokens = torch.zeros(mask.shape[0], voken_hidden.shape[1], dtype=torch.bool, device=mask.device)
            padding = torch.cat([vokens, ~mask], dim=1)  # True: not attended
        queries = self.queries.expand(memory.shape[0], -1, -1)
        return self.out(self.transformer(memory, queries, src_key_padding_mask=padding,
                                         memory_key_padding_mask=padding))
