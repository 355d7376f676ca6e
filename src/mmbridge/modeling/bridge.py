"""The bridge into the LLM: a linear projection of Q-Former outputs to the LLM's embedding width.

MiniGPT-4 calls it `llama_proj`, BLIP-2 `language_projection`; both are one `nn.Linear`, and that is
what a config without `projection_norm` builds (imported weights keep bit-level parity).

With `config.projection_norm` the linear map is followed by an RMS normalisation to a *fixed* scale:
every soft-prompt vector leaves the bridge with the RMS of the frozen LLM's token embeddings
(`config.projection_norm_scale`, measured from the LLM when the model is composed). Why: in a
pre-norm LLM (Llama) the residual stream at a position starts as its input embedding and each layer
*adds* its output; the norms in front of attention and MLP divide the scale out, so the input's size
only decides how loud it is next to what the layers write. An unconstrained linear bridge grows its
output until the soft prompt dominates (measured on the shapes model: norm ≈ 11.5 per soft token vs
≈ 0.37 per token embedding, ~30×), and then what the layers write at those positions (e.g. which token
came before) is drowned out: the LLM cannot read soft tokens the way it reads text. Matching the
scale puts soft tokens in the range the frozen layers were trained on. The scale is a property of the
frozen LLM, not learned (a learned gain would let the bridge grow again), and the normalisation has
no parameters, so the state dict is the same as without it.
"""

from __future__ import annotations

import torch
from torch import nn

from mmbridge.config import MMBridgeConfig


class NormedProjection(nn.Linear):
    """`nn.Linear` then an RMS normalisation to `scale` (per element): `scale * y / rms(y)`. A subclass of
    `nn.Linear`, so the weights keep the projection's names (`projection.weight`, `projection.bias`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, scale: float = 1.0,
                 eps: float = 1e-6):
        super().__init__(in_features, out_features, bias=bias)
        self.scale, self.eps = float(scale), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        y32 = y.float()
        y32 = y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.scale * y32).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rms_scale={self.scale:.4g}"


def embedding_rms(embeddings: torch.Tensor) -> float:
    """Mean over the vocabulary of each token embedding's RMS (the LLM's input scale, per element)."""
    return float(embeddings.detach().float().pow(2).mean(-1).sqrt().mean())


def build_projection(config: MMBridgeConfig) -> nn.Linear:
    width_in, width_out = config.qformer_config.hidden_size, config.text_config.hidden_size
    if not config.projection_norm:
        return nn.Linear(width_in, width_out, bias=config.projection_bias)
    # The scale is filled in from the LLM when the model is built (`MMBridgeModel.__init__`); 1.0 only
    # stands in until then.
    return NormedProjection(width_in, width_out, bias=config.projection_bias,
                            scale=config.projection_norm_scale or 1.0)
