"""Checkpoints prove themselves: one flipped bit in any file of a checkpoint is found on resume (100 % of
the flips tried here), the corrupt newest checkpoint is named and set aside and the previous intact one
is resumed (reproducing the uninterrupted run); corrupt weights, a full disk and a read-only directory
give one line naming the file and the cause."""

import errno
import logging
import random
import shutil

import pytest
import torch

from mmbridge.train import checkpoint as ckpt
from mmbridge.train.config import stage_config_from_dict
from mmbridge.train.fixtures import make_base_model, write_llava
from mmbridge.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def _reset():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt-env")
    make_base_model(root / "base")
    write_llava(root / "llava", n=12)
    return root


def stage(env, **run):
    return stage_config_from_dict({
        "stage": "integrity", "model": str(env / "base"), "train": ["qformer", "projection"],
        "data": {"batch_size": 2, "num_workers": 0, "datasets": [
            {"name": "vqa", "type": "llava_json", "path": str(env / "llava" / "llava.json")}]},
        "schedule": {"total_steps": 4, "warmup_steps": 1, "init_lr": 1e-3, "min_lr": 1e-4},
        "run": {"save_every": 2, "keep_last": 2, "progress_bar": False, **run},
    })


@pytest.fixture(scope="module")
def full_run(env, tmp_path_factory):
    """An uninterrupted run: checkpoints at steps 2 and 4, and its final trainable weights."""
    _reset()
    run = tmp_path_factory.mktemp("full") / "run"
    trainer = Trainer(stage(env), run)
    trainer.fit()
    final = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).trainable_state_dict().items()}
    _reset()
    return run, final


def flip_bit(path, position, bit):
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_every_file_is_listed_and_verifies(full_run):
    run, _ = full_run
    newest = ckpt.latest_checkpoint(run / "checkpoints")
    state = ckpt.verify_checkpoint(newest)
    assert state["step"] == 4
    files = {p.relative_to(newest).as_posix() for p in newest.rglob("*") if p.is_file()}
    kinds = {"trainable.safetensors", "trainer_state.json", "COMPLETE"}
    assert kinds <= files and any(f.startswith("state/") for f in files)
    assert ckpt.newest_verified_checkpoint(run / "checkpoints") == (newest, [])


def test_a_flipped_bit_in_any_checkpoint_file_is_detected(full_run, tmp_path):
    """Every file of the checkpoint (trainable.safetensors, trainer_state.json, COMPLETE, each file of
    state/: optimizer, scheduler, RNG), bits flipped at its first, last and 6 random bytes: 100 % found."""
    run, _ = full_run
    source = ckpt.latest_checkpoint(run / "checkpoints")
    rng = random.Random(0)
    tried, detected, misses = 0, 0, []
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert len(files) >= 5
    for rel in files:
        size = (source / rel).stat().st_size
        positions = {0, size - 1, *(rng.randrange(size) for _ in range(6))}
        for position in sorted(positions):
            copy = tmp_path / f"checkpoint-{tried}"
            shutil.copytree(source, copy)
            flip_bit(copy / rel, position, rng.randrange(8))
            tried += 1
            try:
                ckpt.verify_checkpoint(copy)
            except ckpt.CorruptCheckpointError as err:
                detected += 1
                assert copy.name in str(err) or str(copy / rel) in str(err), str(err)
                assert rel.name in str(err) or rel.as_posix() in str(err), str(err)
            else:
                misses.append((str(rel), position))
            shutil.rmtree(copy)
    assert detected == tried and not misses, f"undetected flips: {misses}"


def test_resume_skips_a_corrupt_newest_checkpoint_and_reproduces_the_run(env, full_run, tmp_path, caplog):
    run, final = full_run
    split = tmp_path / "split"
    split.mkdir()
    # The state of a run killed after step 4 was saved, with one bit of its newest weights flipped.
    shutil.copytree(run / "checkpoints", split / "checkpoints")
    shutil.copy(run / "config.yaml", split / "config.yaml")
    newest = split / "checkpoints" / "checkpoint-4"
    weights = newest / "trainable.safetensors"
    flip_bit(weights, weights.stat().st_size - 3, 2)  # inside the tensor data, not the header

    with caplog.at_level(logging.ERROR, logger="mmbridge"):
        resumed = Trainer(stage(env), split, resume=True)
        resumed.fit()
    assert any("checkpoint-4" in r.getMessage() and "trainable.safetensors" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert (split / "checkpoints" / "checkpoint-4.corrupt").is_dir()  # kept for inspection
    assert [s for s, _ in ckpt.list_checkpoints(split / "checkpoints")] == [2, 4]
    ckpt.verify_checkpoint(split / "checkpoints" / "checkpoint-4")  # redone from step 2, intact
    got = resumed.accelerator.unwrap_model(resumed.model).trainable_state_dict()
    for name in final:
        torch.testing.assert_close(got[name], final[name], rtol=0, atol=1e-6)


def test_no_intact_checkpoint_is_an_error_naming_them(env, full_run, tmp_path):
    run, _ = full_run
    split = tmp_path / "split"
    split.mkdir()
    shutil.copytree(run / "checkpoints", split / "checkpoints")
    shutil.copy(run / "config.yaml", split / "config.yaml")
    for _, path in ckpt.list_checkpoints(split / "checkpoints"):
        flip_bit(path / "trainer_state.json", 5, 1)
    with pytest.raises(ckpt.CorruptCheckpointError) as err:
        Trainer(stage(env), split, resume=True).fit()
    assert "checkpoint-2" in str(err.value) and "checkpoint-4" in str(err.value)
    assert "trainer_state.json" in str(err.value)
    assert [s for s, _ in ckpt.list_checkpoints(split / "checkpoints")] == [2, 4]  # left for the user


def test_old_checkpoints_without_file_hashes_still_check_the_parameter_checksum(full_run, tmp_path):
    run, _ = full_run
    copy = tmp_path / "checkpoint-4"
    shutil.copytree(ckpt.latest_checkpoint(run / "checkpoints"), copy)
    ckpt.write_json(copy / "COMPLETE", {"step": 4})  # the marker before file hashes existed
    assert ckpt.verify_checkpoint(copy)["step"] == 4
    weights = copy / "trainable.safetensors"
    flip_bit(weights, weights.stat().st_size - 3, 2)
    with pytest.raises(ckpt.CorruptCheckpointError, match="parameter checksum"):
        ckpt.verify_checkpoint(copy)


def test_load_trained_model_verifies_and_names_truncated_weights(full_run, tmp_path):
    run, _ = full_run
    copy = tmp_path / "checkpoint-4"
    shutil.copytree(ckpt.latest_checkpoint(run / "checkpoints"), copy)
    weights = copy / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    with pytest.raises(ckpt.CorruptCheckpointError) as err:
        ckpt.load_trained_model(copy)
    assert "trainable.safetensors" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ckpt.CorruptCheckpointError, match="corrupt or truncated safetensors"):
        ckpt.read_trainable(weights)


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only"),
                                              (errno.EACCES, "permission denied")])
def test_full_disk_or_read_only_dir_is_one_line_naming_the_checkpoint(env, tmp_path, monkeypatch, code, words):
    def failing_save(state, path, metadata):
        raise OSError(code, "simulated", str(path))

    monkeypatch.setattr(ckpt, "save_trainable", failing_save)
    trainer = Trainer(stage(env), tmp_path / "run")
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        trainer.fit()
    message = str(err.value)
    assert words in message and "checkpoint-2" in message and "\n" not in message
    assert not list((tmp_path / "run" / "checkpoints").glob(".*.partial"))  # space given back


def test_non_finite_weights_name_the_checkpoint(full_run, tmp_path):
    """A checkpoint whose weights hold NaN (hashes rewritten to match) is refused by name: the NaN losses a
    resume from it would produce are traced to it, not to the data."""
    from safetensors.torch import save_file

    run, _ = full_run
    copy = tmp_path / "checkpoint-4"
    shutil.copytree(ckpt.latest_checkpoint(run / "checkpoints"), copy)
    tensors, metadata = ckpt.read_trainable(copy)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(copy / "trainable.safetensors"), metadata=metadata)
    ckpt.write_json(copy / "COMPLETE", {"step": 4})  # no file hashes: only the tensors can tell
    import json

    trainer_state = json.loads((copy / "trainer_state.json").read_text())
    trainer_state["param_checksums"] = [None]
    ckpt.write_json(copy / "trainer_state.json", trainer_state)
    with pytest.raises(ckpt.CorruptCheckpointError, match="non-finite") as err:
        ckpt.verify_checkpoint(copy)
    assert "checkpoint-4" in str(err.value) and name in str(err.value)
