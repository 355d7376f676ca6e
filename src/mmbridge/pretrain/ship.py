"""Packaging a trained model for the package's assets (`src/mmbridge/assets/models/NAME`).

A recipe's `export` writes a self-contained model: its weights in fp32 and, for a model that draws, a copy
of its generator inside (`model/generator`). Shipped inside the package, both would cost twice: the trained
weights are stored in half precision (fp16 keeps these small weights to ~3 significant digits; they are read
back into fp32) while the frozen parts (vision encoder, LLM, text towers) stay exactly the foundation's, and
the generator is *referenced* — a path relative to the model's directory, resolved when the model loads —
since the shipped foundation already holds the same generator.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

#: Model files that are weights (re-stored in the shipped dtype), not copied as they are.
WEIGHT_FILES = ("model.safetensors", "trainable.safetensors")
#: Adapter weights inside a frozen component (LoRA, trained token rows): trained, so stored in the shipped dtype.
ADAPTER_MARKERS = (".lora_", ".trainable_tokens_")


def frozen_prefixes(config) -> tuple[str, ...]:
    """State-dict prefixes of the components frozen by design (the base model's and each head's defaults, not
    what the last stage happened to train): `vision.`, `llm.`, `act.text_encoder.`, ..."""
    from mmbridge.config import DEFAULT_TRAINABLE

    defaults = dict(DEFAULT_TRAINABLE)
    for head in config.head_configs.values():
        defaults.update(head.components)
    return tuple(f"{component}." for component, trainable in defaults.items() if not trainable)


def ship_model(model_dir: str | Path, out: str | Path, dtype: torch.dtype = torch.float16,
               generator: str | None = None) -> dict:
    """Write `model_dir` to `out` with its trained floating-point weights in `dtype` (the frozen parts as they
    are, bit for bit) and, when `generator` is given, the
    draw heads' generator referenced at that path (relative to `out`, e.g. `../../foundation/shapes/generator`)
    instead of copied. The generator at that path must be byte-identical to the model's own, so that the
    shipped model draws exactly what was measured. Returns a summary (bytes, tensors, max rounding error)."""
    from safetensors.torch import load_file, save_file

    from mmbridge.config import MMBridgeConfig
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.modeling.model import _inside

    model_dir, out = Path(model_dir), Path(out)
    weights = [f for f in WEIGHT_FILES if (model_dir / f).is_file()]
    if len(weights) != 1:
        raise ValueError(f"{model_dir}: expected one of {WEIGHT_FILES} (an unsharded model dir), found {weights}")
    config = json.loads((model_dir / "config.json").read_text())
    draws = {name: head for name, head in (config.get("heads") or {}).items() if head.get("pipeline_path")}
    if generator is not None:
        if not draws:
            raise ValueError(f"{model_dir} has no draw head: nothing to reference a generator for")
        linked = (out / generator).resolve()
        for name, head in draws.items():
            own = Path(_inside(model_dir, head["pipeline_path"]))
            if not _same_files(own, linked):
                raise ValueError(f"head {name!r}: its generator {own} differs from {linked}; ship that one instead")
            head["pipeline_path"] = config["component_paths"][f"{name}.generator"] = generator
    out.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and path.name not in (*WEIGHT_FILES, "config.json"):
            shutil.copy2(path, out / path.name)
        elif path.is_dir() and generator is None:
            shutil.copytree(path, out / path.name, dirs_exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    state = load_file(str(model_dir / weights[0]))
    frozen = frozen_prefixes(MMBridgeConfig.from_pretrained(model_dir))

    def shipped(key: str, value: torch.Tensor) -> torch.Tensor:
        exact = not value.is_floating_point() or (key.startswith(frozen) and not any(m in key for m in ADAPTER_MARKERS))
        return (value if exact else value.to(dtype)).contiguous()

    stored = {k: shipped(k, v) for k, v in state.items()}
    save_file(stored, str(out / weights[0]), metadata={"format": "pt"})

    # It must load, and hold exactly the stored values (fp16 read back into the model's fp32).
    loaded = MMBridgeModel.from_pretrained(out).state_dict()
    worst = _max_diff(loaded, stored)
    if worst != 0.0:
        raise RuntimeError(f"{out}: the loaded model differs from the stored weights (max |diff| {worst})")
    rounding = _max_diff(stored, state)
    return {"model_dir": str(out), "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
            "tensors": len(stored), "tensors_kept_exact": sum(stored[k].dtype == v.dtype for k, v in state.items()),
            "dtype": str(dtype).removeprefix("torch."), "max_rounding_error": rounding,
            "generator": generator}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over `b`'s floating-point tensors."""
    return max((float((a[k].float() - v.float()).abs().max()) for k, v in b.items() if v.is_floating_point()),
               default=0.0)


def _same_files(a: Path, b: Path) -> bool:
    """Two directories with the same files, byte for byte."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
