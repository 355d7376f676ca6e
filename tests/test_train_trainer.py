"""The trainer in-process on a tiny model: frozen parts untouched, small artifact, logs, exact resume,
NaN stop with the last checkpoint intact, corrupt samples skipped while training goes on."""

import csv

import pytest
import torch

from mmbridge.train import checkpoint as ckpt
from mmbridge.train.config import stage_config_from_dict
from mmbridge.train.fixtures import make_base_model, write_llava, write_shards
from mmbridge.train.trainer import NonFiniteLossError, Trainer

pytestmark = pytest.mark.usefixtures("fresh_accelerate")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-env")
    make_base_model(root / "base")  # Q-Former dropout stays on: resume must restore the RNG
    write_shards(root / "wds", num_shards=2, per_shard=12, corrupt={4: "png", 15: "txt"})
    write_llava(root / "llava", n=16)
    return root


def stage(env, **run):
    return stage_config_from_dict({
        "stage": "test", "model": str(env / "base"), "train": ["qformer", "projection"],
        "data": {"batch_size": 3, "num_workers": run.pop("num_workers", 0), "datasets": [
            {"name": "caps", "type": "webdataset", "shards": str(env / "wds" / "shard-{0000..0001}.tar"),
             "weight": 2, "shuffle_buffer": 6},
            {"name": "vqa", "type": "llava_json", "path": str(env / "llava" / "llava.json")}]},
        "schedule": {"total_steps": 6, "warmup_steps": 2, "init_lr": 1e-3, "min_lr": 1e-4},
        "optim": {"grad_accum": 2, "lr_mult": {"projection": 2.0}},
        "run": {"save_every": 2, "keep_last": 2, "progress_bar": False, **run},
    })


def metrics(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"]), int(r["skipped"])) for r in csv.DictReader(f)]


def test_train_keeps_frozen_parts_and_writes_a_small_artifact(env, tmp_path):
    from mmbridge.modeling import MMBridgeModel

    base = MMBridgeModel.from_pretrained(env / "base")
    trainer = Trainer(stage(env), tmp_path / "run")
    result = trainer.fit()
    assert result["step"] == 6
    model = trainer.accelerator.unwrap_model(trainer.model)
    before, after = base.state_dict(), model.state_dict()
    for name, tensor in before.items():
        if name.startswith(("vision.", "llm.")):
            assert torch.equal(tensor, after[name]), f"frozen {name} changed"
    assert not torch.equal(before["projection.weight"], after["projection.weight"])

    # Small artifact: exactly the trainable parameters, nothing frozen.
    newest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    tensors, meta = ckpt.read_trainable(newest)
    assert set(tensors) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(k.startswith(("vision.", "llm.")) for k in tensors)
    assert meta["base_model"] == str(env / "base") and meta["step"] == "6"
    assert torch.equal(tensors["projection.weight"], after["projection.weight"])
    # keep_last=2 of the checkpoints at steps 2, 4, 6.
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == [4, 6]
    # The exported model is the small artifact on top of the frozen components referenced by path.
    exported = MMBridgeModel.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(exported.state_dict()["projection.weight"], after["projection.weight"])
    assert torch.equal(ckpt.load_trained_model(newest).state_dict()["qformer.query_tokens"],
                       after["qformer.query_tokens"])

    rows = metrics(tmp_path / "run")
    assert [r[0] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0][2] == pytest.approx(1e-6) and rows[2][2] == pytest.approx(1e-3)  # warmup_lr -> init_lr
    assert rows[-1][3] >= 1  # the corrupt samples were met, skipped, counted; training went on
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert "skipping sample" in (tmp_path / "run" / "train.log").read_text()


def test_resume_reproduces_the_uninterrupted_run(env, tmp_path):
    full = Trainer(stage(env, num_workers=2), tmp_path / "full")
    full.fit()
    expected = full.accelerator.unwrap_model(full.model).trainable_state_dict()

    from accelerate.state import AcceleratorState, GradientState

    Trainer(stage(env, num_workers=2), tmp_path / "split", max_steps=3).fit()
    with pytest.raises(FileExistsError):
        Trainer(stage(env, num_workers=2), tmp_path / "split")  # no silent overwrite without --resume
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed = Trainer(stage(env, num_workers=2), tmp_path / "split", resume=True)
    resumed.fit()

    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")  # same loss, lr, skip counts
    got = resumed.accelerator.unwrap_model(resumed.model).trainable_state_dict()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_non_finite_loss_stops_with_step_and_batch_named(env, tmp_path, monkeypatch):
    trainer = Trainer(stage(env), tmp_path / "run")
    trainer._build = _poison_after(trainer, trainer._build, bad_call=7)  # step 4, first micro-batch
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    message = str(err.value)
    assert "step 4" in message and ("caps/" in message or "vqa/" in message)
    newest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert newest.name == "checkpoint-2" and newest.name in message
    tensors, _ = ckpt.read_trainable(newest)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert (tmp_path / "run" / "nonfinite_batch.json").is_file()


def _poison_after(trainer, build, bad_call):
    def patched():
        build()
        model = trainer.model
        original = model.forward
        calls = {"n": 0}

        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == bad_call:
                out.losses = {k: v * float("nan") for k, v in out.losses.items()}  # what the trainer sums
            return out

        model.forward = forward
    return patched
