"""FSDP (accelerate's FSDP2 plugin) on 2 CPU processes under torchrun (gloo), next to the DDP test of
tests/test_train_process.py: the same stage YAML trains, checkpoints (sharded model and optimizer state),
resumes and exports, and its loss curve equals one process's on the same global batch.

accelerate 1.15 selects FSDP only on GPU-like devices: on CPU, `ACCELERATE_USE_FSDP=true` (what
`accelerate launch --use_fsdp` / an FSDP config file sets) and an explicit `FullyShardedDataParallelPlugin`
are both ignored, silently, and the run is plain multi-CPU DDP (first test). So the FSDP runs below
start through `FSDP_ON_CPU`, a launcher that makes accelerate take the FSDP branch it takes on GPUs, with
the plugin built from the same FSDP_* variables; everything after that — `prepare` (fully_shard),
the training step, sharded `save_state` / `load_state`, the gathered small artifact — is accelerate's and
the trainer's own code on gloo.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmbridge.train import checkpoint as ckpt
from mmbridge.train.config import load_stage_config
from mmbridge.train.fixtures import make_base_model, write_llava
from mmbridge.train.trainer import Trainer

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.usefixtures("fresh_accelerate")

# What `accelerate launch --config_file fsdp.yaml` exports for an FSDP2 config (docs/scale.md).
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer,ViTLayer", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
            "FSDP_RESHARD_AFTER_FORWARD": "true"}

FSDP_ON_CPU = """
import sys
import accelerate.state as state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

init = state.AcceleratorState.__init__
def init_with_fsdp_on_cpu(self, *args, **kwargs):
    init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and self.__dict__.get("fsdp_plugin") is None:
        self.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* environment, as on GPUs
        self.distributed_type = DistributedType.FSDP
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
state.AcceleratorState.__init__ = init_with_fsdp_on_cpu
from mmbridge.cli import main
sys.exit(main(sys.argv[1:]))
"""

PROBE = """
from accelerate import Accelerator, FullyShardedDataParallelPlugin
acc = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin())
print(f"DISTRIBUTED_TYPE {acc.distributed_type.value}", flush=True)
"""


def child_env(**extra):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return env


def torchrun(*args, timeout=300):
    proc = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *map(str, args)],
                          env=child_env(**FSDP_ENV), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics(run_dir):
    with (run_dir / "metrics.csv").open() as f:
        return [(int(r["step"]), float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)]


def test_accelerate_ignores_fsdp_on_cpu(tmp_path):
    """Why the FSDP runs need FSDP_ON_CPU: accelerate picks plain multi-CPU (DDP) despite the plugin."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = torchrun(script, timeout=120)
    assert proc.stdout.count("DISTRIBUTED_TYPE MULTI_CPU") == 2


def test_fsdp_two_processes_train_resume_and_match_one_process(tmp_path):
    make_base_model(tmp_path / "base", dropout=0.0)
    write_llava(tmp_path / "llava", n=40)
    raw = {"stage": "fsdp", "model": "base", "train": ["qformer", "projection"],
           "data": {"batch_size": 4, "datasets": [{"name": "vqa", "type": "llava_json", "path": "llava/llava.json"}]},
           "schedule": {"total_steps": 4, "warmup_steps": 1, "init_lr": 1e-3, "min_lr": 1e-4},
           "run": {"save_every": 2, "progress_bar": False}}
    config = tmp_path / "stage.yaml"
    config.write_text(yaml.safe_dump(raw))
    launcher = tmp_path / "fsdp_on_cpu.py"
    launcher.write_text(FSDP_ON_CPU)
    run = tmp_path / "fsdp"

    torchrun(launcher, "train", config, "--out", run, "--max-steps", "2")  # stops after checkpoint-2
    state_dir = run / "checkpoints" / "checkpoint-2" / ckpt.STATE_DIR
    assert (state_dir / "pytorch_model_fsdp_0" / ".metadata").is_file()  # sharded model state (one file per rank)
    assert len(list((state_dir / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert (state_dir / "optimizer_0" / ".metadata").is_file()  # sharded optimizer state
    first = json.loads((run / "checkpoints" / "checkpoint-2" / ckpt.TRAINER_STATE_NAME).read_text())
    assert first["num_processes"] == 2 and first["param_checksums"] == [None, None]  # the sharded branch ran

    proc = torchrun(launcher, "train", config, "--out", run, "--resume")  # steps 3-4 from checkpoint-2
    assert "resumed from" in proc.stderr and "(step 2)" in proc.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run / "checkpoints")] == [2, 4]

    one = load_stage_config(config, ["data.batch_size=8"])  # the same global batch in one process
    Trainer(one, tmp_path / "one").fit()
    got, want = metrics(run), metrics(tmp_path / "one")
    assert [s for s, *_ in got] == [1, 2, 3, 4]
    for (s1, loss1, lr1), (s2, loss2, lr2) in zip(got, want):
        assert s1 == s2 and lr1 == lr2 and loss1 == pytest.approx(loss2, rel=1e-5)
    print("fsdp 2-process losses:", [round(loss, 6) for _, loss, _ in got])

    fsdp, _ = ckpt.read_trainable(run / "checkpoints" / "checkpoint-4")  # gathered on the main process
    single, _ = ckpt.read_trainable(tmp_path / "one" / "checkpoints" / "checkpoint-4")
    assert set(fsdp) == set(single)
    for name in single:  # attention key biases: see test_train_process (zero gradient in exact arithmetic)
        if not name.endswith("key.bias"):
            torch.testing.assert_close(fsdp[name], single[name], rtol=1e-4, atol=1e-5, msg=name)

    from mmbridge.modeling import MMBridgeModel

    exported = MMBridgeModel.from_pretrained(run / "model")  # the small artifact on the referenced base
    state = exported.state_dict()
    for name, tensor in fsdp.items():
        assert torch.equal(state[name], tensor), name
