"""Real processes: kill -9 in the middle of a checkpoint save, and a 2-process torchrun run (gloo, CPU)
that must agree with 1 process on the same global batch."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmbridge.train import checkpoint as ckpt
from mmbridge.train.config import load_stage_config
from mmbridge.train.fixtures import make_base_model, write_llava, write_shards
from mmbridge.train.trainer import Trainer

BIN = Path(sys.executable).parent


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


def child_env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    # A clean launch: no inherited torchrun/accelerate variables from an outer launcher.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return env


def write_stage(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def metrics(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)]


# Runs `mmbridge train` and SIGKILLs itself in the middle of saving checkpoint 4: after the state and
# weights are written, before the save is committed (fsync + COMPLETE marker + rename).
KILL_IN_SAVE = """
import os, signal, sys
from mmbridge.train import checkpoint
fsync_tree = checkpoint._fsync_tree
def fsync_or_die(path):
    if path.name == ".checkpoint-4.partial":
        os.kill(os.getpid(), signal.SIGKILL)
    return fsync_tree(path)
checkpoint._fsync_tree = fsync_or_die
from mmbridge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_save_keeps_the_previous_checkpoint(tmp_path):
    make_base_model(tmp_path / "base")
    write_shards(tmp_path / "wds", num_shards=2, per_shard=10, corrupt={3: "png"})
    config = write_stage(tmp_path / "stage.yaml", {
        "stage": "crash", "model": "base", "train": ["qformer", "projection"],
        "data": {"batch_size": 4, "datasets": [
            {"name": "caps", "type": "webdataset", "shards": "wds/shard-{0000..0001}.tar", "shuffle_buffer": 4}]},
        "schedule": {"total_steps": 5, "warmup_steps": 1, "init_lr": 1e-3, "min_lr": 1e-4},
        "run": {"save_every": 2, "keep_last": 3, "progress_bar": False}})
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, "train", str(config), "--out", str(run)],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    root = run / "checkpoints"
    assert (root / ".checkpoint-4.partial" / "trainable.safetensors").is_file()  # killed mid-save
    assert ckpt.latest_checkpoint(root).name == "checkpoint-2"  # the partial one is skipped
    ckpt.load_trained_model(root / "checkpoint-2")  # and the previous one still loads

    stage = load_stage_config(config)
    Trainer(stage, run, resume=True).fit()  # auto-resume from checkpoint-2
    assert not (root / ".checkpoint-4.partial").exists()
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 4, 5]

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    Trainer(stage, tmp_path / "reference").fit()
    got, want = metrics(run), metrics(tmp_path / "reference")
    assert [r[0] for r in got] == [1, 2, 3, 4, 5]
    for (s1, loss1, lr1), (s2, loss2, lr2) in zip(got, want):
        assert s1 == s2 and lr1 == lr2 and loss1 == pytest.approx(loss2, abs=1e-5)


def test_torchrun_two_processes_match_one_process(tmp_path):
    make_base_model(tmp_path / "base", dropout=0.0)  # dropout masks could not match across splits
    write_llava(tmp_path / "llava", n=40)
    raw = {"stage": "ddp", "model": "base", "train": ["qformer", "projection"],
           "data": {"batch_size": 4, "datasets": [{"name": "vqa", "type": "llava_json", "path": "llava/llava.json"}]},
           "schedule": {"total_steps": 4, "warmup_steps": 1, "init_lr": 1e-3, "min_lr": 1e-4},
           "run": {"save_every": 4, "progress_bar": False}}
    config = write_stage(tmp_path / "stage.yaml", raw)
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "mmbridge.train",
                           str(config), "--out", str(tmp_path / "two")],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    state = (tmp_path / "two" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text()
    import json

    state = json.loads(state)
    assert state["num_processes"] == 2
    assert len(set(state["param_checksums"])) == 1  # both ranks hold the same parameters

    one = load_stage_config(config, ["data.batch_size=8"])  # same global batch in one process
    Trainer(one, tmp_path / "one").fit()
    for (s1, loss1, lr1), (s2, loss2, lr2) in zip(metrics(tmp_path / "two"), metrics(tmp_path / "one")):
        assert s1 == s2 and lr1 == lr2 and loss1 == pytest.approx(loss2, rel=1e-5)
    two, _ = ckpt.read_trainable(tmp_path / "two" / "checkpoints" / "checkpoint-4")
    one_, _ = ckpt.read_trainable(tmp_path / "one" / "checkpoints" / "checkpoint-4")
    # Attention key biases get a gradient that is zero in exact arithmetic (softmax ignores a shift
    # shared by all keys); Adam turns their round-off into lr-sized steps, so they are left out.
    for name in one_:
        if not name.endswith("key.bias"):
            torch.testing.assert_close(two[name], one_[name], rtol=1e-4, atol=1e-5, msg=name)
    assert set(two) == set(one_)
