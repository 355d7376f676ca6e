"""Write an mmbridge model dir from (renamed) tensors, checking each against the target model.

The target's keys and shapes come from an `MMBridgeModel` built on the meta device (no memory), so
every importer gets the same guarantees: no unknown key, no shape mismatch (the error names both
shapes), no missing weight except tied aliases (e.g. OPT's `lm_head` = embeddings), which
transformers re-ties when it loads the dir.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from mmbridge.config import COMPONENTS, MMBridgeConfig
from mmbridge.interop.loading import ShapeMismatchError, ShardWriter, check_shape

#: Where a component's weights live inside `MMBridgeModel`'s state dict.
PREFIXES = {name: f"{name}." for name in COMPONENTS}


def target_layout(config: MMBridgeConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(key -> shape, tied alias keys) of the model `config` describes, built on the meta device."""
    from mmbridge.modeling import MMBridgeModel

    return module_layout(MMBridgeModel, config)


def module_layout(cls, config) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(key -> shape, tied alias keys) of `cls(config)`, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = cls(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    seen: dict[int, str] = {}
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.setdefault(id(param), name)
    return shapes, aliases


def write_model_dir(out: str | Path, config: MMBridgeConfig, processor,
                    tensors: Iterable[tuple[str, torch.Tensor, str]], dtype: torch.dtype | None = None) -> dict:
    """Stream `(target_key, tensor, source_label)` into `out` and save config + processor.

    Components listed in `config.component_paths` are referenced, not stored: the remaining weights
    go to the core's small-artifact file (`trainable.safetensors`), otherwise to sharded
    `model*.safetensors` that `MMBridgeModel.from_pretrained` loads through transformers.
    Returns a summary (keys written, bytes, skipped aliases).
    """
    from mmbridge.modeling.model import TRAINABLE_WEIGHTS_NAME

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes, aliases = target_layout(config)
    linked = tuple(PREFIXES[name] for name in config.component_paths)
    expected = {k: v for k, v in shapes.items() if not k.startswith(linked)} if linked else shapes

    written: set[str] = set()
    if linked:
        from safetensors.torch import save_file

        state = {}
        for key, tensor, source in tensors:
            if key in aliases:
                continue  # tied to another weight (OPT's lm_head): stored once, re-tied on load
            check_shape(key, tensor.shape, expected, source=f"{source} -> ")
            state[key] = (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()
        save_file(state, str(out / TRAINABLE_WEIGHTS_NAME), metadata={"format": "pt"})
        written = set(state)
        total = sum(t.numel() * t.element_size() for t in state.values())
    else:
        writer = ShardWriter(out, dtype=dtype)
        for key, tensor, source in tensors:
            if key in aliases:
                continue
            check_shape(key, tensor.shape, expected, source=f"{source} -> ")
            writer.add(key, tensor)
        written = set(writer.close())
        total = writer.total_bytes

    missing = sorted(set(expected) - written - aliases)
    if missing:
        raise ShapeMismatchError(f"the source provides no weights for {len(missing)} key(s) of the model, "
                                 f"e.g. {missing[:8]}")
    if dtype is not None:
        config.dtype = dtype  # `from_pretrained(dtype="auto")` then loads in the written dtype
    config.save_pretrained(out)
    processor.save_pretrained(out)
    return {"keys": len(written), "bytes": total, "tied_aliases": sorted(aliases & set(expected) - written)}


def remap(key: str, prefix: str, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Map a source key into component `prefix`: as is, or with its first name stripped
    (`vision_model.encoder…` of a CLIP/BLIP-2 dir -> `vision.model.encoder…` of a bare vision model)."""
    candidates = [prefix + key]
    if "." in key:
        candidates.append(prefix + key.split(".", 1)[1])
    return next((c for c in candidates if c in expected), None)
