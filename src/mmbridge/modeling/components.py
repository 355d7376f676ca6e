"""Load a pretrained component from a local directory by its kind: a transformers Auto class or a
diffusers model / scheduler class. Frozen parts referenced by `config.component_paths` (a vision
encoder, an LLM, and for the draw head a VAE, a UNet and a scheduler) all come in through here.

diffusers (a dependency) is imported only when a diffusers kind is asked for: a see-only model never pays
for its import.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from mmbridge.modeling.loading import load_streaming, needs_conversion, safetensors_files

#: kind -> (library, class name). Schedulers load with `from_pretrained` like models (their config only).
COMPONENT_KINDS = {
    "vision": ("transformers", "AutoModel"),
    "llm": ("transformers", "AutoModelForCausalLM"),
    "text_encoder": ("transformers", "AutoModel"),
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "scheduler": ("diffusers", "DDIMScheduler"),
}


def _library(name: str):
    if name == "diffusers":
        try:
            import diffusers
        except ImportError:
            raise ImportError("this component is a diffusers model and diffusers is not installed "
                              "(a dependency of mmbridge: reinstall it, or pip install diffusers)") from None
        return diffusers
    import transformers

    return transformers


def load_component(kind: str, path: str | Path, dtype: torch.dtype | None = None, subfolder: str | None = None,
                   class_name: str | None = None):
    """`kind` is a key of `COMPONENT_KINDS`; `class_name` overrides its class (e.g. another scheduler).
    `path` must be a local directory: nothing is downloaded."""
    if kind not in COMPONENT_KINDS:
        raise ValueError(f"unknown component kind {kind!r}; known: {sorted(COMPONENT_KINDS)}")
    library, default_class = COMPONENT_KINDS[kind]
    directory = Path(path).expanduser()
    if not (directory / (subfolder or "")).is_dir():
        raise FileNotFoundError(f"{directory / (subfolder or '')} is not a local directory; mmbridge loads "
                                "components from local directories only")
    cls = getattr(_library(library), class_name or default_class)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if kind == "scheduler":
        return cls.from_pretrained(directory, **kwargs)
    if library == "transformers" and subfolder is None:
        files = safetensors_files(directory)
        if needs_conversion(files, dtype):
            # Converted while read, one chunk at a time (`modeling.loading`): transformers' loader keeps
            # the stored copy's pages resident until the end.
            config = transformers.AutoConfig.from_pretrained(directory)
            build = (lambda: cls.from_config(config)) if hasattr(cls, "from_config") else (lambda: cls(config))
            model = load_streaming(build, files, dtype)
            if model is not None:
                return model.eval()
    if dtype is not None:
        kwargs["torch_dtype" if library == "diffusers" else "dtype"] = dtype
    return cls.from_pretrained(directory, **kwargs)
