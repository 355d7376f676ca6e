"""Checkpoints a user can trust after a crash.

Layout of `RUN/checkpoints/checkpoint-N/`:

    trainable.safetensors   the small artifact: only parameters with requires_grad (MiniGPT-4 style),
                            metadata names the base model directory it sits on
    state/                  accelerate `save_state`: optimizer, scheduler, grad scaler, and the RNG
                            of every process (random_states_<rank>.pkl); model weights are not
                            duplicated here (they are the small artifact above)
    trainer_state.json      step, samples seen, data position of every process, param checksums
    COMPLETE                written last; a directory without it is never resumed from

Atomicity: everything is written into `.checkpoint-N.partial`, fsynced, and only then renamed to
`checkpoint-N` (rename is atomic on POSIX filesystems). A kill -9 mid-save leaves a `.partial`
directory that auto-resume ignores and the next save removes; the previous checkpoint is untouched.
Old checkpoints beyond `keep_last` are renamed away before deletion, so a half-deleted one never
looks complete either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TRAINABLE_NAME = "trainable.safetensors"
STATE_DIR = "state"
TRAINER_STATE_NAME = "trainer_state.json"
COMPLETE_NAME = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"checkpoint-{step}"


def is_complete(path: Path) -> bool:
    marker = Path(path) / COMPLETE_NAME
    try:
        json.loads(marker.read_text())
        json.loads((Path(path) / TRAINER_STATE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return (Path(path) / TRAINABLE_NAME).is_file()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first; partial or damaged ones are left out."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def partial_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    complete = {p for _, p in list_checkpoints(root)}
    return sorted(p for p in root.iterdir() if p.is_dir() and p not in complete
                  and (p.name.endswith(".partial") or _NAME.match(p.name)))


def _fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` to disk (rename alone does not order data writes)."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_trainable(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt", **metadata})


def save_checkpoint(accelerator, root: Path, step: int, trainable_state: dict[str, torch.Tensor] | None,
                    trainer_state: dict, base_model: str, keep_last: int) -> Path | None:
    """Collective: every process calls it. Returns the committed directory on the main process."""
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = root / f".{final.name}.partial"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed mid-save
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE_DIR))  # every process writes its own RNG file
    if accelerator.is_main_process:
        save_trainable(trainable_state, tmp / TRAINABLE_NAME,
                       {"base_model": str(base_model), "step": str(step)})
        write_json(tmp / TRAINER_STATE_NAME, trainer_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        marker = tmp / COMPLETE_NAME
        write_json(marker, {"step": step})
        _fsync_tree(tmp)
        if final.exists():  # e.g. re-saving a step after resuming from an older checkpoint
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final if accelerator.is_main_process else None


def _remove(path: Path) -> None:
    trash = path.with_name(f".{path.name}.deleting")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)  # no longer matches checkpoint-N, so never mistaken for complete
    shutil.rmtree(trash)


def prune(root: Path, keep_last: int) -> None:
    checkpoints = list_checkpoints(root)
    for _, path in checkpoints[: max(0, len(checkpoints) - keep_last)]:
        _remove(path)
    for leftover in Path(root).glob(".*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)


def read_trainable(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if path.is_dir():
        path = path / TRAINABLE_NAME
    tensors = {}
    with safe_open(str(path), framework="pt") as f:  # safetensors: no pickle, nothing executes
        metadata = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, metadata


def load_trainable_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy trainable tensors into `model`, refusing unknown names or shapes (no silent partial load)."""
    expected = model.state_dict()
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ValueError(f"checkpoint holds weights the model does not have: {unknown[:5]}")
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in tensors.items()
           if v.shape != expected[k].shape]
    if bad:
        raise ValueError("checkpoint shape mismatch: " + "; ".join(bad[:5]))
    model.load_state_dict(tensors, strict=False)


def load_trained_model(checkpoint: str | os.PathLike, base_model: str | None = None):
    """A checkpoint's small artifact on top of the base model it names -> `MMBridgeModel` (eval mode)."""
    from mmbridge.modeling import MMBridgeModel

    tensors, metadata = read_trainable(Path(checkpoint))
    base = base_model or metadata.get("base_model")
    if not base:
        raise ValueError(f"{checkpoint} does not name its base model; pass base_model=")
    model = MMBridgeModel.from_pretrained(base)
    load_trainable_into(model, tensors)
    return model.eval()
