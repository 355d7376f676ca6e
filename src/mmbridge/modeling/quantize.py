"""Int8 weight-only linear layers for CPU decoding (what `quantize="int8"` / `"int8-g32"` load or convert to).

Batch-1 decoding reads every LLM weight once per token; int8 weights read a quarter of fp32's bytes.
Two layouts:

- `"int8"`: one scale per output row. The matmul is PyTorch's own CPU kernel `aten._weight_int8pack_mm`
  (the one gpt-fast and torchao's former int8 weight-only path call), bf16 activations: the fastest.
- `"int8-g32"`: one scale per 32 input columns of each row (group-wise, as GPTQ / torchao's
  `group_size`), for accuracy: a row's largest weight then sets the step of 32 weights, not of thousands,
  and the rounding error falls by ~35 %. On random 0.1-1 B LLMs (near-tied logits) per-row int8 keeps 93 % of
  fp32's greedy tokens and group-wise 96 % (docs/speed.md). No PyTorch CPU kernel takes group-wise int8, so its
  product for a few rows is a `torch.compile`d dequantize-multiply-reduce that inductor fuses into one pass
  over the int8 weights, in fp32 (`_group_gemv`); many rows use a blocked, compiled dequantize + bf16 GEMM
  (`_blocked_linear`).

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
#: Up to this many rows a group-wise layer runs its fused GEMV (`_group_gemv`, compiled once per weight shape
#: and row count); more rows dequantize blocks of `DEQUANT_BLOCK` output rows for bf16 GEMMs. 1 B-model
#: shapes on 2 threads, every weight read from memory (docs/speed.md): a 5632 x 2048 layer takes 0.50 / 1.1 /
#: 1.9 / 3.4 ms at 1 / 2 / 4 / 8 rows fused, 2.1 ms dequantized at 4 or 8 rows (fp32: 2.5 / 5.1 / 5.8 / 4.6 ms);
#: the 32000-row LM head favours the fused GEMV up to 8 rows, so 4 is where the two meet.
GEMV_ROWS = 4
#: 1024 rows x 2048 columns of bf16 is 4 MB: small enough that the allocator reuses it from call to call (a
#: whole dequantized LM head, 131 MB, is mapped and page-faulted anew on every call: 4x slower than fp32).
DEQUANT_BLOCK = 1024
#: the longest reduction `_group_gemv` runs in one piece (down projections' 5,632 columns go in 4 chunks)
GEMV_CHUNK = 2048

logger = logging.getLogger(__name__)


def _group_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A few rows `x` (M, I) times a group-wise int8 `weight` (O, I) with `scale` (O, I / group), in fp32.
    Written as a reduction over each dequantized weight row (in chunks of at most `GEMV_CHUNK` columns, whole
    groups each), output rows outermost: inductor then fuses the dequantization into vectorised dot products
    and reads each weight row from memory once for all M rows. (Summing each group of 32 first, then the
    scaled groups, runs 1.5-1.8x slower; one reduction over 5632 columns 1.7x slower than four of 1408.)"""
    rows, groups = scale.shape
    chunks = next(k for k in range(-(-weight.shape[1] // GEMV_CHUNK), groups + 1) if groups % k == 0)
    dequantized = weight.view(rows, groups, -1).to(torch.float32) * scale.view(rows, groups, 1)
    products = dequantized.view(rows, 1, chunks, -1) * x.to(torch.float32).reshape(1, x.shape[0], chunks, -1)
    return products.sum(-1).sum(-1).t()


def _dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A block of group-wise int8 rows as bf16 (one fused pass when compiled; eager runs it in 3 passes)."""
    rows, groups = scale.shape
    dequantized = weight.view(rows, groups, -1).to(torch.float32) * scale.view(rows, groups, 1)
    return dequantized.to(torch.bfloat16).view(rows, -1)


class _CompiledOnFirstUse:
    """`fn` through `torch.compile`, with static shapes: one kernel per weight shape and row count (dynamic
    shapes run 20-100x slower here). A 1 B LLM needs ~20 of them, more than dynamo's default
    `recompile_limit` (8) after which it would silently run `fn` eagerly, so a call with a new shape raises the
    limit for its own compile. If compiling fails (no C++ compiler for inductor, an inductor failure) the
    eager function runs from then on, with one warning: correct, but slower than fp32."""

    def __init__(self, fn):
        self.fn, self.compiled, self.shapes = fn, None, set()

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=False)
        if self.compiled is not self.fn:
            shapes = tuple((a.shape, a.dtype) for a in args)  # what a static-shape kernel is specialised on
            try:
                if shapes in self.shapes:
                    return self.compiled(*args)
                with torch._dynamo.config.patch(recompile_limit=len(self.shapes) + 8):
                    out = self.compiled(*args)
                self.shapes.add(shapes)
                return out
            except Exception as error:  # no C++ compiler, an inductor failure: keep decoding, say why
                logger.warning("int8-g32: torch.compile of %s failed (%s); running it eagerly, which is slower "
                               "than fp32", self.fn.__name__, error)
                self.compiled = self.fn
        return self.fn(*args)


group_gemv = _CompiledOnFirstUse(_group_gemv)
dequantize = _CompiledOnFirstUse(_dequantize)


def _blocked_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Many rows `x` (M, I) times a group-wise int8 `weight`, `DEQUANT_BLOCK` output rows at a time, in
    bf16 as the per-row layout's prefill (the dequantized weights' bf16 rounding adds ~5 % to the int8
    rounding error's variance)."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    x = x.to(torch.bfloat16)
    for start in range(0, weight.shape[0], DEQUANT_BLOCK):
        part = slice(start, start + DEQUANT_BLOCK)
        torch.mm(x, dequantize(weight[part], scale[part]).t(), out=out[:, part])
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
                out = group_gemv(flat, self.weight, self.scale)
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
