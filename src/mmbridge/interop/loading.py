"""Safe, lean reading and writing of weights for importers and loaders.

Security: safetensors is preferred everywhere. Pickle-based checkpoints (`.pth`, `.pt`, `.bin`) are
read only through `torch.load(weights_only=True)`, which unpickles nothing but tensors and plain
containers. If that refuses a file we raise `UnsafeCheckpointError` — there is deliberately no
retry in unrestricted mode: such a file can run arbitrary code when unpickled.

Memory: tensors are streamed one at a time (`safe_open`, memory-mapped `torch.load`), renamed, cast and
written into shards, so converting a model never holds two copies of it. Loading a converted model
goes through transformers' `from_pretrained`, which builds the model on the meta device and assigns
the (memory-mapped) tensors instead of initialising and then copying.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Shard size of written model dirs (the HF default).
MAX_SHARD_BYTES = 5 * 1024**3


class UnsafeCheckpointError(ValueError):
    """A checkpoint that can only be read by executing pickled code; it is refused, never retried."""


class ShapeMismatchError(ValueError):
    """A tensor from a checkpoint does not fit the model it is imported into."""


class CorruptWeightsError(ValueError):
    """A weights file that cannot be read as what it claims to be (truncated, damaged); names the file."""


class WeightsWriteError(ValueError):
    """Weights could not be written (disk full, read-only directory); names the path and the cause."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _is_corruption(err: BaseException) -> bool:
    """Errors safetensors / torch.load raise on damaged bytes (not a missing file, not a refused pickle)."""
    if isinstance(err, (EOFError, UnicodeDecodeError)):
        return True
    name = type(err).__name__
    if name in ("SafetensorError", "BadZipFile", "HeaderTooLarge", "HeaderTooSmall", "InvalidHeader"):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, ValueError, OSError)) and not isinstance(err, FileNotFoundError) and any(
        word in text for word in ("PytorchStreamReader", "invalid header", "header", "incomplete metadata",
                                  "file might be corrupted", "out of bounds", "truncated", "invalid load key",
                                  "unexpected EOF", "central directory"))


def corrupt_weights_error(path: str | Path, err: BaseException) -> CorruptWeightsError:
    return CorruptWeightsError(f"{path}: corrupt or truncated weights file ({_first_line(err)})")


def explain_load_error(directory: str | Path, err: BaseException) -> str | None:
    """One line for a model directory that failed to load because of its files: names the damaged
    weights file (safetensors headers are checked, cheaply) or the unwritable/full disk. None when the
    error is something else."""
    if isinstance(err, (CorruptWeightsError, WeightsWriteError)):
        return _first_line(err)
    if isinstance(err, OSError) and err.errno in (28, 30, 13, 122):
        from mmbridge.train.checkpoint import describe_os_error

        return f"cannot load {directory}: {describe_os_error(err)}"
    if not _is_corruption(err):
        return None
    try:
        files = checkpoint_files(directory)
    except (OSError, ValueError, KeyError):
        files = []
    for file in files:
        try:
            if file.suffix in SAFE_SUFFIXES:
                from safetensors import safe_open

                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    list(handle.keys())
        except Exception as file_err:
            return _first_line(corrupt_weights_error(file, file_err))
    return _first_line(corrupt_weights_error(directory, err))


def write_error(path: str | Path, err: OSError) -> WeightsWriteError:
    from mmbridge.train.checkpoint import describe_os_error

    return WeightsWriteError(f"cannot write {path}: {describe_os_error(err)}")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {list(DTYPES)}")
    return DTYPES[dtype]


# -- reading --------------------------------------------------------------------------------
def load_pickle_checkpoint(path: str | Path) -> object:
    """`torch.load(weights_only=True)` with a clear error instead of any unsafe fallback."""
    path = Path(path)
    try:
        # mmap: large .bin shards are paged in lazily instead of read whole into memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        if _is_corruption(err):
            raise corrupt_weights_error(path, err) from err
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it contains pickled objects other than tensors, which could execute "
            f"code when loaded ({str(err).splitlines()[0]}). Convert it to safetensors with a trusted tool."
        ) from err
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except RuntimeError as err:
        # Non-zip legacy files cannot be mmapped; retry without mmap, still weights_only=True.
        if "mmap" not in str(err):
            raise corrupt_weights_error(path, err) from err
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err2:
            if _is_corruption(err2):
                raise corrupt_weights_error(path, err2) from err2
            raise UnsafeCheckpointError(f"refusing to load {path}: {str(err2).splitlines()[0]}") from err2
        except Exception as err2:
            raise corrupt_weights_error(path, err2) from err2
    except (OSError, EOFError, ValueError) as err:  # a truncated zip archive reads as EINVAL
        raise corrupt_weights_error(path, err) from err


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """One weights file -> state dict (safetensors, or pickle through `weights_only=True`)."""
    path = Path(path)
    if path.suffix in SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except FileNotFoundError:
            raise
        except Exception as err:  # SafetensorError: bad header, truncated data
            raise corrupt_weights_error(path, err) from err
    if path.suffix in PICKLE_SUFFIXES:
        state = load_pickle_checkpoint(path)
        if not isinstance(state, dict):
            raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
        return state
    raise ValueError(f"unsupported weights file {path} (expected .safetensors, .pth, .pt, .bin)")


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The weight files of an HF model dir: safetensors if present (sharded or not), else .bin."""
    directory = Path(directory)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [directory / shard for shard in shards]
        if (directory / single).is_file():
            return [directory / single]
    raise FileNotFoundError(f"{directory} holds no model.safetensors or pytorch_model.bin (sharded or not)")


def iter_tensors(directory: str | Path, wanted: Callable[[str], bool] = lambda key: True
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of an HF model dir, one tensor in memory at a time; `wanted` filters keys
    before anything is read (importing a Q-Former does not read an 11B language model)."""
    for file in checkpoint_files(directory):
        if file.suffix in SAFE_SUFFIXES:
            from safetensors import safe_open

            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                keys = list(handle.keys())
            except Exception as err:  # SafetensorError: bad header, truncated file
                raise corrupt_weights_error(file, err) from err
            with handle:
                for key in keys:
                    if wanted(key):
                        try:
                            tensor = handle.get_tensor(key)
                        except Exception as err:
                            raise corrupt_weights_error(file, err) from err
                        yield key, tensor
        else:
            for key, tensor in load_state_dict(file).items():
                if wanted(key):
                    yield key, tensor


# -- writing --------------------------------------------------------------------------------
def expected_shapes(model_factory: Callable[[], torch.nn.Module]) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes of a model built on the meta device: costs no memory."""
    with torch.device("meta"):
        model = model_factory()
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_shape(key: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]], source: str = "") -> None:
    if key not in expected:
        raise ShapeMismatchError(f"{source}{key}: the target model has no such weight")
    if tuple(shape) != expected[key]:
        raise ShapeMismatchError(
            f"{source}{key}: checkpoint shape {tuple(shape)} does not match the model's {expected[key]}")


class ShardWriter:
    """Writes tensors into `model-0000i-of-0000n.safetensors` shards plus the HF index, as they come."""

    def __init__(self, directory: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._pending or any(key in shard for shard in self._shards):
            raise ValueError(f"weight {key} written twice")
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[key] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        index = len(self._shards)
        target = self.directory / f"_shard{index}.tmp"
        try:
            save_file(self._pending, str(target), metadata={"format": "pt"})
        except OSError as err:
            target.unlink(missing_ok=True)
            raise write_error(target, err) from err
        except Exception as err:  # safetensors reports I/O failures as SafetensorError with the errno text
            target.unlink(missing_ok=True)
            raise WeightsWriteError(f"cannot write {target}: {_first_line(err)}") from err
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shards (`model.safetensors` when there is one) and write the index; returns the keys."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        names = ["model.safetensors"] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for i, name in enumerate(names):
            (self.directory / f"_shard{i}.tmp").replace(self.directory / name)
        if count > 1:
            weight_map = {key: names[i] for i, keys in enumerate(self._shards) for key in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [key for keys in self._shards for key in keys]


# -- quantization ---------------------------------------------------------------------------
def quantization_config(bits: int | None):
    """bitsandbytes 8/4-bit config for `from_pretrained`, or a clear error where it cannot work."""
    if bits is None:
        return None
    if bits not in (4, 8):
        raise ValueError(f"quantization supports 8 or 4 bits, not {bits}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{bits}-bit loading needs bitsandbytes on a CUDA GPU, and no GPU is available here. "
            "On CPU, load with --dtype bfloat16 (half the memory of float32) instead."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"{bits}-bit loading needs the bitsandbytes package: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4")


def hf_component_tensors(directory: str | Path, kind: str = "model", dtype: torch.dtype | None = None
                         ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of an HF component dir as its *module* names (`kind`: "model" or "causal_lm").

    Loaded through transformers' `from_pretrained` rather than read from the files: it applies the
    checkpoint key conversions of transformers v5 (e.g. legacy ViT names -> `q_proj`), builds on
    the meta device and memory-maps safetensors, so this holds one copy of the component at most.
    """
    from transformers import AutoModel, AutoModelForCausalLM

    auto = {"model": AutoModel, "causal_lm": AutoModelForCausalLM}[kind]
    model = auto.from_pretrained(Path(directory), dtype=dtype or "auto")
    yield from model.state_dict().items()


def load_model(directory: str | Path, dtype: str | torch.dtype | None = None, bits: int | None = None):
    """Load an mmbridge model dir for inference: chosen dtype, optional bitsandbytes 8/4-bit (GPU only)."""
    from mmbridge.modeling import MMBridgeModel

    dtype = resolve_dtype(dtype)
    quantization = quantization_config(bits)  # raises with a clear message on CPU
    try:
        if quantization is None:
            return MMBridgeModel.from_pretrained(directory, dtype=dtype).eval()
        return MMBridgeModel.from_pretrained(directory, dtype=dtype, quantization_config=quantization,
                                             device_map="auto").eval()
    except Exception as err:
        line = explain_load_error(directory, err)
        if line is not None:
            raise CorruptWeightsError(line) from err
        raise
