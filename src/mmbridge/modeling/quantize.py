"""Int8 weight-only linear layers for CPU decoding (what `quantize="int8"` / `"int8-g32"` load or convert to).

Batch-1 decoding reads every LLM weight once per token; int8 weights read a quarter of fp32's bytes.
Two layouts:

- `"int8"`: one scale per output row. The matmul is PyTorch's own CPU kernel `aten._weight_int8pack_mm`
  (the one gpt-fast and torchao's former int8 weight-only path call), bf16 activations: the fastest.
- `"int8-g32"`: one scale per 32 input columns of each row (group-wise, as GPTQ / torchao's
  `group_size`), for accuracy: a row's largest weight then sets the step of 32 weights, not of thousands,
  and the rounding error falls by ~35 %. On random 0.1-1 B LLMs (near-tied logits) per-row int8 keeps 93 % of
  fp32's greedy tokens and group-wise 96 % (docs/speed.md). No PyTorch CPU kernel takes group-wise int8, so its
  batch-1 product is a `torch.compile`d dequantize-multiply-reduce that inductor fuses into one pass over
  the int8 weights, in fp32 (`_group_gemv`); many rows use a blocked dequantize + bf16 GEMM (`_blocked_linear`).

torchao installs on the CPU route too, but its current `Int8WeightOnlyConfig` runs eagerly as dequantize +
matmul, 20-40x slower than fp32 on CPU, so neither layout goes through it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

QUANTIZE_CHOICES = ("int8", "int8-g32")
#: quantize option -> input columns per scale (None: one scale per output row).
GROUP_SIZES = {"int8": None, "int8-g32": 32}
#: From this many rows (a prefill, a large batch) a per-row int8 weight is widened to bf16 for one GEMM
#: instead: `_weight_int8pack_mm` is a GEMV-style kernel whose cost grows with the rows (73 rows x 2048 ->
#: 5632: 32.5 ms, vs 9.4 ms for widening + a bf16 GEMM; at 8 rows the kernel wins, 4.7 ms; one thread, AMX CPU).
PREFILL_ROWS = 16
#: Up to this many rows a group-wise layer runs its fused GEMV row by row (its cost is linear in the rows:
#: 5632 x 2048 on 2 threads, 0.7 ms per row against fp32's 2.4 ms at one row, 5.3 ms at four); more rows
#: dequantize blocks of `DEQUANT_BLOCK` output rows into a small reused buffer for bf16 GEMMs (a whole
#: dequantized weight would be allocated and page-faulted on every call: 3x slower).
GEMV_ROWS = 4
DEQUANT_BLOCK = 256

logger = logging.getLogger(__name__)


def _group_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One row `x` (1, I) times a group-wise int8 `weight` (O, I) with `scale` (O, I / group), in fp32."""
    rows, groups = scale.shape
    grouped = weight.view(rows, groups, -1).to(torch.float32) * x.to(torch.float32).view(1, groups, -1)
    return (grouped.sum(-1) * scale).sum(-1).view(1, rows)


_compiled_gemv = None


def group_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`_group_gemv` compiled once per weight shape (static shapes: one row; inductor's C++ backend needs
    a compiler). If compiling fails the eager function runs — correct, but slower than fp32."""
    global _compiled_gemv
    if _compiled_gemv is None:
        _compiled_gemv = torch.compile(_group_gemv, dynamic=False)
    if _compiled_gemv is not _group_gemv:
        try:
            return _compiled_gemv(x, weight, scale)
        except Exception as error:  # no C++ compiler, an inductor failure: keep decoding, say why
            logger.warning("int8-g32: torch.compile of the group-wise GEMV failed (%s); running it eagerly, "
                           "which is slower than fp32", error)
            _compiled_gemv = _group_gemv
    return _group_gemv(x, weight, scale)


def _blocked_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Many rows `x` (M, I) times a group-wise int8 `weight`, `DEQUANT_BLOCK` output rows at a time, in
    bf16 as the per-row layout's prefill (the dequantized weights' bf16 rounding adds ~5 % to the int8
    rounding error's variance)."""
    rows, groups = scale.shape
    out = torch.empty(x.shape[0], rows, dtype=torch.bfloat16)
    x = x.to(torch.bfloat16)
    block = torch.empty(min(DEQUANT_BLOCK, rows), groups, weight.shape[1] // groups, dtype=torch.bfloat16)
    for start in range(0, rows, DEQUANT_BLOCK):
        part = slice(start, start + DEQUANT_BLOCK)
        dequantized = block[: len(weight[part])]
        torch.mul(weight[part].view(-1, groups, block.shape[-1]), scale[part].unsqueeze(-1), out=dequantized)
        torch.mm(x, dequantized.view(len(dequantized), -1).t(), out=out[:, part])
    return out


class Int8WeightOnlyLinear(nn.Module):
    """`nn.Linear` with symmetric int8 weights: one scale per output row (`group_size=None`) or per
    `group_size` input columns of each row. Per-row layers cast activations to bf16 for the kernel;
    group-wise layers compute a few rows in fp32, more in bf16. Either way the output goes back to the
    input's dtype, so the rest of the model (norms, residual stream, attention) keeps its own precision —
    fp32 by default, which is what keeps greedy decoding close to the fp32 model (bf16 through the whole
    residual stream costs more agreement than the int8 weights do)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 group_size: int | None = None):
        super().__init__()
        if group_size is not None and in_features % group_size:
            group_size = None  # a width the groups do not divide: one scale per row
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        scale_shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("scale", torch.empty(scale_shape, dtype=self._scale_dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @property
    def _scale_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.group_size is None else torch.float32  # the per-row kernel takes bf16

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> Int8WeightOnlyLinear:
        layer = cls(linear.in_features, linear.out_features, bias=False, group_size=group_size)
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
        groups = 1 if self.group_size is None else self.in_features // self.group_size
        grouped = weight.view(self.out_features, groups, -1)
        low, high = grouped.aminmax(dim=-1)  # no |weight| temporary of the full size
        scale = torch.maximum(low.abs(), high).clamp(min=1e-8) / 127.0
        quantized = torch.empty(grouped.shape, dtype=torch.int8)
        # in blocks of rows: the float temporaries stay small (a 1 B model's LM head is 268 MB in fp32),
        # which keeps a quantizing load's peak memory near the int8 model's size
        block = torch.empty(min(2048, weight.shape[0]), *grouped.shape[1:])
        for start in range(0, weight.shape[0], len(block)):
            rows = slice(start, start + len(block))
            out = block[: len(grouped[rows])]
            torch.div(grouped[rows], scale[rows, :, None], out=out)
            quantized[rows] = out.round_().clamp_(-127, 127)
        self.weight = quantized.view(self.out_features, self.in_features)
        self.scale = (scale.squeeze(-1) if self.group_size is None else scale).to(self._scale_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if self.group_size is not None:
            if flat.shape[0] <= GEMV_ROWS:
                out = torch.cat([group_gemv(row[None], self.weight, self.scale) for row in flat])
            else:
                out = _blocked_linear(flat, self.weight, self.scale)
            out = out.to(x.dtype)
        else:
            flat = flat.to(torch.bfloat16).contiguous()
            if flat.shape[0] >= PREFILL_ROWS:  # int8 values are exact in bf16
                out = (nn.functional.linear(flat, self.weight.to(torch.bfloat16)) * self.scale).to(x.dtype)
            else:
                out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        scales = "per row" if self.group_size is None else f"per {self.group_size} columns"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only, scales {scales}"


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


def quantize_int8_(module: nn.Module, group_size: int | None = None) -> int:
    """Replace every plain `nn.Linear` under `module` (see `int8_targets`) by `Int8WeightOnlyLinear`
    (scales per row, or per `group_size` columns), in place; returns how many."""
    names = int8_targets(module)
    for name in names:
        replace_module(module, name, Int8WeightOnlyLinear.from_linear(module.get_submodule(name), group_size))
    return len(names)


def has_int8(module: nn.Module) -> bool:
    return any(isinstance(m, Int8WeightOnlyLinear) for m in module.modules())
