"""Loading stored weights into another dtype (or int8) without holding the stored copy in memory.

transformers' loader maps the whole safetensors file and converts tensor by tensor, but the mapped
pages it has read stay resident (and counted in the process's RSS) until the file is closed: loading
a 3.9 GB fp32 model as bf16 peaked at 1.5x the file, as int8 (bf16 first, then quantized) the same
(`mmbridge bench`, memory rows). Here the model is built on the meta device, and the file is read in
chunks of `CHUNK_BYTES`, each opened and closed on its own, every tensor converted (or quantized to
int8, from the stored precision) as it is read: the peak is the converted model plus one chunk.
accelerate's `init_empty_weights` and `set_module_tensor_to_device` do the meta-device work; the chunked
reading is ours (no library streams a safetensors file into a smaller dtype with bounded memory).

Used only where it is safe: the file's keys must be exactly the model's (tied weights aside), else
the caller falls back to transformers' loader (real published checkpoints with legacy key names).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mmbridge.modeling.quantize import Int8WeightOnlyLinear, int8_targets, replace_module

CHUNK_BYTES = 256 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def safetensors_files(directory: Path) -> list[Path]:
    """The weight files of a transformers-saved dir: `model.safetensors`, or the shards its index names."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    single = directory / "model.safetensors"
    return [single] if single.exists() else []


def stored_layout(files: list[Path]) -> dict[str, tuple[Path, torch.dtype | None, int]]:
    """key -> (file, stored dtype (None: not a float), bytes), from the files' headers only."""
    layout = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                shape = view.get_shape()
                dtype = _DTYPES.get(view.get_dtype())
                numel = 1
                for n in shape:
                    numel *= n
                layout[key] = (file, dtype, numel * (dtype.itemsize if dtype is not None else 8))
    return layout


def needs_conversion(files: list[Path], dtype: torch.dtype | None) -> bool:
    return dtype is not None and any(d is not None and d != dtype for _, d, _ in stored_layout(files).values())


def model_keys(model: nn.Module, stored: list[str]) -> dict[str, str] | None:
    """stored key -> the model's key, through transformers' own checkpoint renamings (e.g. a ViT saves
    `attention.attention.query`, legacy names, for `attention.query`); None where a stored key is not
    the model's or needs one of transformers' tensor converters (merges, splits)."""
    from transformers import PreTrainedModel
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    transforms = get_model_conversion_mapping(model) if isinstance(model, PreTrainedModel) else []
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    names = {}
    for key in stored:
        name, converter = rename_source_key(key, renamings, converters, prefix, expected)
        if converter is not None or name not in expected:
            return None
        names[key] = name
    return names


def _chunks(keys: list[str], layout: dict, limit: int) -> list[list[str]]:
    chunks, current, size = [], [], 0
    for key in keys:
        if current and size + layout[key][2] > limit:
            chunks.append(current)
            current, size = [], 0
        current.append(key)
        size += layout[key][2]
    return chunks + ([current] if current else [])


def load_streaming(build: Callable[[], nn.Module], files: list[Path], dtype: torch.dtype | None = None,
                   quantize_under: nn.Module | Callable[[nn.Module], nn.Module] | None = None,
                   chunk_bytes: int | None = None, group_size: int | None = None) -> nn.Module | None:
    """Build a model with `build()` on the meta device and fill it from `files`, converting float tensors
    to `dtype` as they are read. `quantize_under(model)` names the submodule whose plain linears become
    int8 (quantized from the stored weights; scales per row, or per `group_size` columns). Returns None,
    having read nothing, when the files' keys are not the model's (then use transformers' loader)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    layout = stored_layout(files)
    with init_empty_weights(include_buffers=False):
        model = build()
    names = model_keys(model, list(layout))
    if names is None:
        return None
    int8_layers: dict[str, Int8WeightOnlyLinear] = {}
    if quantize_under is not None:
        root = quantize_under(model)
        prefix = next((name for name, module in model.named_modules() if module is root), "")
        for name in int8_targets(root) if root is not None else []:
            linear = root.get_submodule(name)
            layer = Int8WeightOnlyLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                         device="meta", group_size=group_size)
            replace_module(root, name, layer)
            int8_layers[f"{prefix}.{name}" if prefix else name] = layer
    for file in files:
        stored = [k for k, (f, _, _) in layout.items() if f == file]
        for chunk in _chunks(stored, layout, chunk_bytes or CHUNK_BYTES):
            # One open per chunk: closing the file unmaps the pages read so far.
            with safe_open(str(file), framework="pt") as f:
                for stored_key in chunk:
                    tensor, key = f.get_tensor(stored_key), names[stored_key]
                    module_name, _, leaf = key.rpartition(".")
                    layer = int8_layers.get(module_name)
                    if layer is not None and leaf == "weight":
                        layer.set_float_weight(tensor)
                        continue
                    # Always a copy: a tensor read from the file shares its memory map, and one kept
                    # (same dtype) would keep the whole mapping and every page read through it resident.
                    if layer is not None:  # the bias of an int8 layer stays fp32
                        tensor = tensor.to(torch.float32, copy=True)
                    elif dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype, copy=True)
                    else:
                        tensor = tensor.clone()
                    set_module_tensor_to_device(model, key, "cpu", value=tensor, dtype=tensor.dtype)
                    del tensor
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ValueError(f"{files[0].parent} does not hold weights for {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}")
    return model
