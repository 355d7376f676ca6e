"""Corrupt / truncated weight files and failing writes give one line naming the file and the cause, in the
library (safetensors, `.pth`, shard writing) and on the command line (`chat`, `import`, `train`)."""

import errno
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mmbridge.cli import main
from mmbridge.interop import loading
from mmbridge.interop.loading import CorruptWeightsError, ShardWriter, WeightsWriteError


def test_truncated_safetensors_names_the_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptWeightsError) as err:
        loading.load_state_dict(path)
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptWeightsError, match="g.safetensors"):
        loading.load_state_dict(garbage)


def test_truncated_pth_names_the_file_and_is_not_called_unsafe(tmp_path):
    path = tmp_path / "proj.pth"
    torch.save({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError) as err:
        loading.load_state_dict(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_full_disk_while_writing_shards_says_so(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    writer = ShardWriter(tmp_path / "out")
    writer.add("a", torch.ones(4))
    with pytest.raises(WeightsWriteError) as err:
        writer.close()
    assert "disk full" in str(err.value) and str(tmp_path / "out") in str(err.value)


@pytest.fixture
def damaged_model(tmp_path):
    from mmbridge.serve.testing import shared_tiny_model_dir

    model = tmp_path / "model"
    shutil.copytree(shared_tiny_model_dir(), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return model


def test_chat_on_truncated_weights_is_one_line(damaged_model, capsys):
    assert main(["chat", "--model", str(damaged_model), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors" in err and "corrupt or truncated" in err


def test_load_model_names_the_damaged_file(damaged_model):
    with pytest.raises(CorruptWeightsError, match="model.safetensors"):
        loading.load_model(damaged_model)
