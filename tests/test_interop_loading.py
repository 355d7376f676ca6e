"""Safe and lean loading: pickle payloads refused, shapes checked, dtype honoured, clear quantization errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
from pathlib import Path

import pytest
import torch

import mmbridge
from mmbridge.interop.loading import (
    ShapeMismatchError,
    ShardWriter,
    UnsafeCheckpointError,
    checkpoint_files,
    iter_tensors,
    load_state_dict,
    quantization_config,
    resolve_dtype,
)


class _Payload:
    """Unpickling this calls `Path.touch(marker)`: code execution at load time."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(2, 2), "payload": _Payload(marker)}}, checkpoint)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        load_state_dict(checkpoint)
    from mmbridge.interop.minigpt4 import load_minigpt4_projection

    with pytest.raises(UnsafeCheckpointError):
        load_minigpt4_projection(checkpoint)
    assert not marker.exists(), "the pickle payload ran"
    # Control: the payload is real — unrestricted unpickling (never done by mmbridge) runs it.
    torch.load(checkpoint, weights_only=False)
    assert marker.exists()


def test_no_unsafe_torch_load_anywhere_in_the_code_base():
    root = Path(mmbridge.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        if re.search(r"weights_only\s*=\s*False", text) or re.search(r"pickle\.loads?\(", text):
            offenders.append(str(path))
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path}: {call.group(0)}")
    assert not offenders


def test_plain_tensor_checkpoints_load(tmp_path):
    state = {"a": torch.arange(6.0).reshape(2, 3)}
    torch.save({"model": state}, tmp_path / "ok.pth")
    assert torch.equal(load_state_dict(tmp_path / "ok.pth")["model"]["a"], state["a"])
    with pytest.raises(ValueError, match="unsupported"):
        load_state_dict(tmp_path / "weights.npz")


def test_shard_writer_streams_and_indexes(tmp_path):
    writer = ShardWriter(tmp_path, dtype=torch.bfloat16, max_shard_bytes=64)
    tensors = {f"w{i}": torch.randn(4, 4) for i in range(5)}  # 32 bytes each in bf16 -> 3 shards
    for key, tensor in tensors.items():
        writer.add(key, tensor)
    assert sorted(writer.close()) == sorted(tensors)
    assert len(checkpoint_files(tmp_path)) == 3 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = dict(iter_tensors(tmp_path))
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], tensors[k].bfloat16()) for k in tensors)
    assert list(iter_tensors(tmp_path, wanted=lambda k: k == "w3")) [0][0] == "w3"


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(None) is None
    with pytest.raises(ValueError, match="float32"):
        resolve_dtype("int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
@pytest.mark.parametrize("bits", [8, 4])
def test_quantization_on_cpu_gives_a_clear_message(bits):
    with pytest.raises(RuntimeError, match=rf"{bits}-bit loading needs bitsandbytes on a CUDA GPU.*bfloat16"):
        quantization_config(bits)
    with pytest.raises(ValueError, match="8 or 4"):
        quantization_config(3)


def test_minigpt4_projection_for_a_different_llm_names_both_shapes(tmp_path):
    from mmbridge.interop.minigpt4 import import_minigpt4
    from mmbridge.interop.tiny import build_tiny_blip2, build_tiny_llama, save_minigpt4_projection

    build_tiny_blip2(tmp_path / "blip2")
    build_tiny_llama(tmp_path / "llm", hidden=40)  # "13B": hidden 40
    save_minigpt4_projection(tmp_path / "proj.pth", in_features=32, out_features=24)  # "7B": trained for 24
    with pytest.raises(ShapeMismatchError, match=r"\(24, 32\).*\(40, 32\)"):
        import_minigpt4(tmp_path / "blip2", tmp_path / "proj.pth", tmp_path / "llm", tmp_path / "out")


def test_blip2_import_dtype_and_load(tmp_path):
    from mmbridge.interop.blip2 import import_blip2
    from mmbridge.interop.loading import load_model
    from mmbridge.interop.tiny import build_tiny_blip2

    build_tiny_blip2(tmp_path / "hf", llm="llama")
    import_blip2(tmp_path / "hf", tmp_path / "mm", dtype=torch.bfloat16)
    stored = dict(iter_tensors(tmp_path / "mm"))
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    model = load_model(tmp_path / "mm")  # dtype "auto": as written
    assert model.llm.model.dtype == torch.bfloat16
    assert load_model(tmp_path / "mm", dtype="float32").projection.weight.dtype == torch.float32
