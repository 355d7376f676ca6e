"""MiniGPT-5's feature mapper: the vokens' LLM hidden states -> the generator's conditioning sequence.

Linear(llm -> d)-GELU-Linear(d -> d), then a transformer encoder-decoder whose decoder reads a learned
query table (77 queries for Stable Diffusion: the length of its text-encoder sequence), then a
projection to the UNet's cross-attention width. Written with torch's `nn.Transformer`, as the seed does.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureMapper(nn.Module):
    def __init__(self, llm_hidden_size: int, hidden_size: int, condition_dim: int, num_queries: int,
                 encoder_layers: int, decoder_layers: int, num_heads: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(llm_hidden_size, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.transformer = nn.Transformer(d_model=hidden_size, nhead=num_heads, num_encoder_layers=encoder_layers,
                                          num_decoder_layers=decoder_layers, dim_feedforward=4 * hidden_size,
                                          dropout=0.0, batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden_size) * 0.02)
        self.out = nn.Linear(hidden_size, condition_dim)

    def forward(self, voken_hidden: torch.Tensor) -> torch.Tensor:
        """(n, num_vokens, llm_hidden) -> (n, num_queries, condition_dim)."""
        memory = self.mlp(voken_hidden.to(self.out.weight.dtype))
        queries = self.queries.expand(memory.shape[0], -1, -1)
        return self.out(self.transformer(memory, queries))
