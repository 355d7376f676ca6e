"""Checkpoints a user can trust after a crash.

Layout of `RUN/checkpoints/checkpoint-N/`:

    trainable.safetensors   the small artifact: only parameters with requires_grad (MiniGPT-4 style),
                            metadata names the base model directory it sits on
    state/                  accelerate `save_state`: optimizer, scheduler, grad scaler, and the RNG
                            of every process (random_states_<rank>.pkl); model weights are not
                            duplicated here (they are the small artifact above)
    trainer_state.json      step, samples seen, data position of every process, param checksums
    COMPLETE                written last; a directory without it is never resumed from. It holds the
                            SHA-256 of every other file of the checkpoint and one of itself

Verification: `verify_checkpoint` re-hashes every file against COMPLETE (and the trainable tensors
against the parameter checksum of `trainer_state.json`), so one flipped bit anywhere is found;
`newest_verified_checkpoint` is what resume uses: a corrupt newest checkpoint is reported by name and
the previous intact one is taken.

Atomicity: everything is written into `.checkpoint-N.partial`, fsynced, and only then renamed to
`checkpoint-N` (rename is atomic on POSIX filesystems). A kill -9 mid-save leaves a `.partial`
directory that auto-resume ignores and the next save removes; the previous checkpoint is untouched.
Old checkpoints beyond `keep_last` are renamed away before deletion, so a half-deleted one never
looks complete either.
"""

from __future__ import annotations

import errno
import hashlib
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
_HASH_CHUNK = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint (or weights file) whose bytes are not the ones that were written; names the file."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only or unwritable directory); names the path."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.errno = errno_


def describe_os_error(err: OSError) -> str:
    """The cause of an OSError in words a user acts on ("disk full", "read-only")."""
    causes = {errno.ENOSPC: "disk full (no space left on device)", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied (directory not writable)",
              errno.EPERM: "operation not permitted"}
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return causes.get(err.errno, err.strerror or str(err)) + where


def param_checksum(state: dict[str, torch.Tensor]) -> str:
    """Order-independent digest of a state dict's values (also stored per process in trainer_state.json)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _manifest(directory: Path) -> dict[str, str]:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != COMPLETE_NAME:
            files[path.relative_to(directory).as_posix()] = file_sha256(path)
    return files


def marker_text(step: int, files: dict[str, str]) -> str:
    """COMPLETE's exact bytes: step, file hashes and a hash of those two (so the marker checks itself)."""
    body = {"step": step, "files": files}
    return _canonical({**body, "sha256": hashlib.sha256(_canonical(body).encode()).hexdigest()})


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"checkpoint-{step}"


def is_complete(path: Path) -> bool:
    """The save finished (COMPLETE is written last, inside the `.partial` dir, before the rename). Whether
    the bytes are still intact is `verify_checkpoint`'s question."""
    return (Path(path) / COMPLETE_NAME).is_file()


def verify_checkpoint(path: Path) -> dict:
    """Check every file of a complete checkpoint against the hashes in COMPLETE and the trainable tensors
    against trainer_state.json's parameter checksum. Returns the trainer state; raises
    `CorruptCheckpointError` naming the checkpoint, the file and what is wrong."""
    path = Path(path)

    def corrupt(name: str, why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"checkpoint {path} is corrupt: {name} {why}")

    try:
        raw = (path / COMPLETE_NAME).read_bytes()
    except OSError as err:
        raise corrupt(COMPLETE_NAME, f"cannot be read ({describe_os_error(err)})") from err
    try:
        marker = json.loads(raw.decode("utf-8"))
        files = marker.get("files") if isinstance(marker, dict) else None
    except (UnicodeDecodeError, ValueError) as err:
        raise corrupt(COMPLETE_NAME, "is not valid JSON") from err
    if files is not None:  # checkpoints written before file hashes existed have only {"step": N}
        if not isinstance(files, dict) or raw.decode() != marker_text(marker.get("step"), files):
            raise corrupt(COMPLETE_NAME, "does not match its own checksum")
        for name, expected in files.items():
            file = path / name
            if not file.is_file():
                raise corrupt(name, "is missing")
            if file_sha256(file) != expected:
                raise corrupt(name, "does not match its SHA-256 in COMPLETE (changed after it was written)")
    try:
        state = json.loads((path / TRAINER_STATE_NAME).read_text())
        step = state["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise corrupt(TRAINER_STATE_NAME, "cannot be read") from err
    if files is not None and step != marker.get("step"):
        raise corrupt(TRAINER_STATE_NAME, f"says step {step}, COMPLETE says {marker.get('step')}")
    tensors, _ = read_trainable(path)
    stored = [c for c in state.get("param_checksums") or [] if c]
    if stored and param_checksum(tensors) != stored[0]:
        raise corrupt(TRAINABLE_NAME, "does not match the parameter checksum in trainer_state.json")
    # The trainer never saves after a non-finite loss, so NaN/inf weights here would be the cause of
    # the NaN losses that follow a resume: name them now.
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise corrupt(TRAINABLE_NAME, f"holds non-finite values (NaN/inf) in {bad[:3]}")
    return state


def newest_verified_checkpoint(root: Path) -> tuple[Path | None, list[tuple[Path, CorruptCheckpointError]]]:
    """The newest complete checkpoint that verifies, and the newer ones rejected (with why)."""
    rejected = []
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as err:
            rejected.append((path, err))
            continue
        return path, rejected
    return None, rejected


def set_aside(path: Path) -> Path:
    """Rename a corrupt checkpoint out of the `checkpoint-N` namespace (kept for inspection, never pruned
    in its place nor resumed from)."""
    target = path.with_name(f"{path.name}.corrupt")
    if target.exists():
        shutil.rmtree(target)
    os.replace(path, target)
    return target


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first; partial ones are left out (not yet verified:
    see `verify_checkpoint`)."""
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
    try:
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
            # Hashes are taken from the files as written (every process's RNG file included).
            (tmp / COMPLETE_NAME).write_text(marker_text(step, _manifest(tmp)))
            _fsync_tree(tmp)
            if final.exists():  # e.g. re-saving a step after resuming from an older checkpoint
                _remove(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            prune(root, keep_last)
    except OSError as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written .partial is never resumed; free the space
        raise CheckpointWriteError(f"cannot write checkpoint {final}: {describe_os_error(err)}", err.errno) from err
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
    try:
        with safe_open(str(path), framework="pt") as f:  # safetensors: no pickle, nothing executes
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError for truncation)
        raise CorruptCheckpointError(f"{path}: corrupt or truncated safetensors file "
                                     f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
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

    if is_complete(Path(checkpoint)):  # a training checkpoint: prove its bytes first
        verify_checkpoint(Path(checkpoint))
    tensors, metadata = read_trainable(Path(checkpoint))
    base = base_model or metadata.get("base_model")
    if not base:
        raise ValueError(f"{checkpoint} does not name its base model; pass base_model=")
    model = MMBridgeModel.from_pretrained(base)
    load_trainable_into(model, tensors)
    return model.eval()
