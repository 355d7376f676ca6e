"""Int8 weight-only linear layers for CPU decoding (what `quantize="int8"` loads or converts to).

Batch-1 decoding reads every LLM weight once per token; int8 weights read a quarter of fp32's bytes.
The matmul is PyTorch's own CPU kernel `aten._weight_int8pack_mm` (the one gpt-fast and torchao's
former int8 weight-only path call): int8 weights, one scale per output row, bf16 activations. torchao
installs on the CPU route too, but its current `Int8WeightOnlyConfig` runs eagerly as dequantize +
matmul, 20-40x slower than fp32 on CPU, so the kernel is called directly here.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZE_CHOICES = ("int8",)
#: From this many rows (a prefill, a large batch) the int8 weight is widened to bf16 for one GEMM instead:
#: `_weight_int8pack_mm` is a GEMV-style kernel whose cost grows with the rows (73 rows x 2048 -> 5632:
#: 32.5 ms, vs 9.4 ms for widening + a bf16 GEMM; at 8 rows the kernel wins, 4.7 ms; one thread, AMX CPU).
PREFILL_ROWS = 16


class Int8WeightOnlyLinear(nn.Module):
    """`nn.Linear` with int8 weights and one scale per output row (symmetric). Activations are cast to
    bf16 for the kernel and its output back to the input's dtype, so the rest of the model (norms,
    residual stream, attention) keeps its own precision — fp32 by default, which is what keeps greedy
    decoding close to the fp32 model (bf16 through the whole residual stream costs more agreement than
    the int8 weights do)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        layer = cls(linear.in_features, linear.out_features, bias=False)
        layer.set_float_weight(linear.weight)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().float().clone()
        return layer

    def set_float_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight (any float dtype; from the stored one is the most exact) into this layer."""
        weight = weight.detach().float()
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for an int8 linear of "
                             f"{(self.out_features, self.in_features)}")
        low, high = weight.aminmax(dim=1)  # no |weight| temporary of the full size
        scale = torch.maximum(low.abs(), high).clamp(min=1e-8) / 127.0
        quantized = torch.empty(weight.shape, dtype=torch.int8)
        # in blocks of rows: the float temporaries stay small (a 1 B model's LM head is 268 MB in fp32),
        # which keeps a quantizing load's peak memory near the int8 model's size
        block = torch.empty(min(2048, weight.shape[0]), weight.shape[1])
        for start in range(0, weight.shape[0], len(block)):
            rows = slice(start, start + len(block))
            out = block[: len(weight[rows])]
            torch.div(weight[rows], scale[rows, None], out=out)
            quantized[rows] = out.round_().clamp_(-127, 127)
        self.weight = quantized
        self.scale = scale.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        if flat.shape[0] >= PREFILL_ROWS:  # int8 values are exact in bf16
            out = (nn.functional.linear(flat, self.weight.to(torch.bfloat16)) * self.scale).to(x.dtype)
        else:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


def int8_targets(module: nn.Module) -> list[str]:
    """Names of the plain `nn.Linear`s under `module` that int8 quantization replaces. Linears inside
    peft layers (LoRA, trainable token rows) are left alone: their forward reads the float weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    skip: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, BaseTunerLayer):
            skip.update(id(m) for m in sub.modules())
    return [name for name, sub in module.named_modules() if type(sub) is nn.Linear and id(sub) not in skip]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def quantize_int8_(module: nn.Module) -> int:
    """Replace every plain `nn.Linear` under `module` (see `int8_targets`) by `Int8WeightOnlyLinear`,
    in place; returns how many."""
    names = int8_targets(module)
    for name in names:
        replace_module(module, name, Int8WeightOnlyLinear.from_linear(module.get_submodule(name)))
    return len(names)


def has_int8(module: nn.Module) -> bool:
    return any(isinstance(m, Int8WeightOnlyLinear) for m in module.modules())
