"""Models known by name (shipped with the package) and where they live."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: name -> folder under `mmbridge/assets/models/`.
SHIPPED_MODELS = {"shapes": "shapes"}


def shipped_model_dir(name: str) -> Path:
    return Path(str(resources.files("mmbridge").joinpath("assets", "models", SHIPPED_MODELS[name])))


def resolve_model_path(name_or_dir: str | Path) -> Path:
    """A shipped model's name or a local directory -> an existing model directory, or a clear error."""
    if str(name_or_dir) in SHIPPED_MODELS:
        path = shipped_model_dir(str(name_or_dir))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"the shipped model {name_or_dir!r} is not part of this installation yet "
                f"(expected at {path}); pass a model directory instead"
            )
        return path
    path = Path(name_or_dir).expanduser()
    if not path.is_dir():
        known = ", ".join(sorted(SHIPPED_MODELS))
        raise FileNotFoundError(
            f"{name_or_dir} is neither a model directory nor a shipped model name ({known}); "
            "mmbridge never downloads weights, so give a local directory"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; is it a model directory written by save_pretrained?")
    return path


def sample_images_dir() -> Path:
    return Path(str(resources.files("mmbridge").joinpath("assets", "samples")))
