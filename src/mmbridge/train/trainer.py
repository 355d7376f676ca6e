"""The training loop: one stage of an `MMBridgeModel` on accelerate.

The same code runs on 1 CPU process, `torchrun --nproc_per_node N` (gloo on CPU, NCCL on GPU) and
FSDP / DeepSpeed set up through `accelerate config` — accelerate owns the distributed details.

Loss normalisation is by *answer tokens of the whole global batch* (all micro-batches of a step on
all processes), not a mean of per-batch means: a step then computes the same gradient whatever the
split into processes and accumulation steps, which is what makes 1-vs-N-process runs comparable.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from mmbridge.config import QFORMER_LOSSES
from mmbridge.train import checkpoint as ckpt
from mmbridge.train.config import ConfigError, StageConfig
from mmbridge.train.data import MODEL_INPUTS, OPTIONAL_MODEL_INPUTS, build_dataloader
from mmbridge.train.schedule import build_scheduler

logger = logging.getLogger("mmbridge.train")
CSV_FIELDS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "samples", "skipped", "elapsed_s")
#: Losses normalised by the answer tokens of the whole global batch; every other loss is a per-batch mean.
TOKEN_LOSSES = ("lm",)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stopped before the update, the last checkpoint is intact."""


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # LAVIS / BLIP-2 rule: biases, norm weights and other 1-d params are not decayed.
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered or ".ln" in lowered


def component_of(param_name: str, components) -> str:
    """The component (a module path such as `qformer` or `draw.mapper`) a parameter belongs to."""
    matches = [c for c in components if param_name.startswith(f"{c}.")]
    return max(matches, key=len) if matches else param_name.split(".", 1)[0]


def param_groups(model: torch.nn.Module, stage: StageConfig) -> list[dict]:
    """One AdamW group per (component, decay/no-decay), each with its own lr multiplier."""
    groups = {}
    components = model.config.components if hasattr(model, "config") else ()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        component = component_of(name, components)
        # rows frozen by `token_rows` must not decay either (AdamW decays a parameter whatever its gradient)
        decay = not no_decay(name, param) and not (stage.token_rows is not None and "trainable_tokens_delta" in name)
        mult = stage.optim.lr_mult.get(component, 1.0)
        key = (component, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "component": component, "lr_mult": mult,
                           "lr": stage.schedule.init_lr * mult,
                           "weight_decay": stage.optim.weight_decay if decay else 0.0}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def token_row_matches(token: str, patterns: list[str]) -> bool:
    """`token` is one of `patterns` or starts with a pattern's text before its final "*" (no glob classes:
    the tokens themselves hold brackets)."""
    return any(token == p or (p.endswith("*") and token.startswith(p[:-1])) for p in patterns)


def freeze_token_rows(model, patterns: list[str]) -> list[str]:
    """Let only the rows of the added tokens matching `patterns` train: the gradient of every other row of
    the trainable-rows adapter (peft's `TrainableTokensLayer`, rows in the order of the sorted token ids) is
    zeroed, so AdamW leaves it exactly as it was (`param_groups` gives these rows no weight decay then).
    Returns the tokens that train."""
    added = model.config.added_tokens or {}
    token_of = {token_id: token for token, token_id in added.items()}
    ids = sorted(added.values())
    keep = torch.tensor([token_row_matches(token_of[i], patterns) for i in ids])
    if not keep.any():
        raise ValueError(f"token_rows {patterns} match none of the model's added tokens {list(added)[:8]}...")
    deltas = [p for n, p in model.llm.named_parameters() if "trainable_tokens_delta" in n and p.requires_grad]
    for param in deltas:
        mask = keep.to(param.dtype)[:, None]
        param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))
    return [token_of[i] for i, k in zip(ids, keep.tolist()) if k]


def _mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"  # CPU autocast is slower than fp32 for these sizes and changes numerics


def _distributed_cpu_launch() -> bool:
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return launched and not torch.cuda.is_available()


def limit_cpu_threads(num_workers: int) -> int | None:
    """For a CLI run on CPU: oversubscribed intra-op threads spin against dataloader workers and
    other processes (measured 20x slower with 2 threads + 1 worker on 2 cores). Unless
    OMP_NUM_THREADS says otherwise, leave one core per worker and share the rest among the local
    processes. Not applied to in-process `Trainer` use, which keeps the caller's setting."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = max(1, (os.cpu_count() or 1) // local - num_workers)
    torch.set_num_threads(threads)
    return threads


_checksum = ckpt.param_checksum  # per-process parameter digest stored in (and verified from) trainer_state.json


class Trainer:
    def __init__(self, stage: StageConfig, run_dir: str | os.PathLike, *, resume: bool = False,
                 max_steps: int | None = None):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.stage = stage
        self.run_dir = Path(run_dir).resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resume = resume
        self.stop_at = min(stage.schedule.total_steps, max_steps or stage.schedule.total_steps)
        # Accumulation is done by hand (no_sync + one optimizer step), so accelerate's own counter
        # stays at 1 and cannot disagree with ours after a resume.
        self._log_file = None
        self.accelerator = Accelerator(
            # accelerate only sets up gloo for a torchrun/launch on a GPU-less machine when told cpu=True.
            cpu=_distributed_cpu_launch(),
            mixed_precision=_mixed_precision(stage.run.mixed_precision),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=stage.run.find_unused_parameters)],
        )
        self._setup_run_dir()

    # -- setup -------------------------------------------------------------------------------
    def _setup_run_dir(self) -> None:
        acc = self.accelerator
        existing = ckpt.latest_checkpoint(self.ckpt_root)
        if existing is not None and not self.resume:
            raise FileExistsError(f"{self.run_dir} already holds checkpoints (newest {existing.name}); "
                                  "pass --resume to continue it, or choose a new --out")
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = yaml.safe_dump(self.stage.to_dict(), sort_keys=False)
            previous = self.run_dir / "config.yaml"
            if self.resume and previous.is_file() and previous.read_text() != resolved:
                logger.warning("the stage config differs from the one this run started with (%s)", previous)
            previous.write_text(resolved)
            self._log_file = logging.FileHandler(self.run_dir / "train.log")
            self._log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(self._log_file)
        if not logger.handlers or all(isinstance(h, logging.FileHandler) for h in logger.handlers):
            stream = logging.StreamHandler(sys.stderr)
            stream.setFormatter(logging.Formatter(f"[rank {acc.process_index}] %(levelname)s %(message)s"))
            logger.addHandler(stream)
        logger.setLevel(logging.INFO)

    def _build(self):
        from accelerate.utils import DistributedType, set_seed

        from mmbridge.modeling import MMBridgeModel
        from mmbridge.processing import MMBridgeProcessor

        acc, stage = self.accelerator, self.stage
        set_seed(stage.run.seed, device_specific=True)  # different dropout per process, reproducible
        model = MMBridgeModel.from_pretrained(stage.model)
        self.processor = MMBridgeProcessor.from_pretrained(stage.model)
        self._check_against_model(model.config)
        model.config.trainable = {c: c in stage.train for c in model.config.components}
        if stage.llm_lora and not model.config.llm_lora:
            model.add_llm_lora(stage.llm_lora)
        model.apply_trainable_policy()
        for name, param in model.llm.named_parameters():
            if ".lora_" in name:
                param.requires_grad_(bool(stage.llm_lora))
        if stage.token_rows is not None:
            rows = freeze_token_rows(model, stage.token_rows)
            logger.info("stage %s: the LLM rows of %d added tokens train (token_rows), the others are frozen",
                        stage.stage, len(rows))
        model.train()  # frozen components stay in eval mode (see MMBridgeModel.train)
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable_names:
            raise ValueError(f"nothing to train: components {stage.train} have no parameters")
        groups = param_groups(model, stage)
        optimizer = torch.optim.AdamW(
            [{k: v for k, v in g.items() if k != "names"} for g in groups],
            lr=stage.schedule.init_lr, betas=tuple(stage.optim.betas), eps=stage.optim.eps)
        scheduler = build_scheduler(optimizer, stage.schedule)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.scheduler = scheduler  # stepped by us once per optimizer step (not per process)
        acc.register_for_checkpointing(scheduler)
        self.sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if not self.sharded:
            # Model weights live in the small artifact; keep accelerate from writing the frozen LLM
            # into every checkpoint (and from loading it back).
            acc.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
            acc.register_load_state_pre_hook(lambda models, inp: models.clear())
        n_train = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        logger.info("stage %s: training %s (%d of %d parameters), %d process(es), mixed precision %s",
                    stage.stage, stage.train + (["LoRA on the llm"] if stage.llm_lora else []), n_train, n_all,
                    acc.num_processes, acc.mixed_precision)

    def _check_against_model(self, config) -> None:
        """What a stage names must exist in this model: its components and the losses it can report."""
        stage = self.stage
        unknown = [c for c in [*stage.train, *stage.optim.lr_mult] if c not in config.components]
        if unknown:
            raise ConfigError(f"train: unknown component(s) {unknown}; "
                              f"this model's components: {list(config.components)}")
        bad = [n for n in stage.losses if n not in config.loss_names]
        if bad:
            raise ConfigError(f"losses: this model cannot compute {bad}; it reports {list(config.loss_names)}")
        self.loss_names = [n for n, w in stage.losses.items() if w]
        if not self.loss_names:
            raise ConfigError("losses: give at least one loss a non-zero weight")

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.sharded:  # gathers the full state on the main process
            full = self.accelerator.get_state_dict(self.model)
            return {k: v for k, v in full.items() if k in set(self.trainable_names)}
        return self.accelerator.unwrap_model(self.model).trainable_state_dict()

    # -- resume ------------------------------------------------------------------------------
    def _restore(self) -> dict:
        """Load the newest complete checkpoint (if resuming); return this process's data state."""
        self.step, self.samples = 0, 0
        if not self.resume:
            return {}
        partial = ckpt.partial_checkpoints(self.ckpt_root)
        if partial:
            logger.warning("ignoring incomplete checkpoint(s) %s", [p.name for p in partial])
        # Every file is re-hashed against COMPLETE before anything is loaded; a corrupt newest
        # checkpoint is named, set aside (checkpoint-N.corrupt) and the previous intact one is used.
        path, rejected = ckpt.newest_verified_checkpoint(self.ckpt_root)
        if path is None and rejected:  # left in place: a later --resume must not start from step 0
            raise ckpt.CorruptCheckpointError(
                "no intact checkpoint to resume from: " + "; ".join(str(e) for _, e in rejected))
        for _bad, err in rejected:
            logger.error("%s; falling back to the previous checkpoint", err)
        if rejected:
            self.accelerator.wait_for_everyone()  # every process has verified before the rename
            if self.accelerator.is_main_process:
                for bad, _ in rejected:
                    logger.error("moved the corrupt checkpoint aside to %s", ckpt.set_aside(bad))
            self.accelerator.wait_for_everyone()
        if path is None:
            logger.info("--resume: no complete checkpoint in %s, starting from step 0", self.ckpt_root)
            return {}
        tensors, _ = ckpt.read_trainable(path)
        if not self.sharded:
            ckpt.load_trainable_into(self.accelerator.unwrap_model(self.model), tensors)
        self.accelerator.load_state(str(path / ckpt.STATE_DIR))  # optimizer, scheduler, scaler, RNG
        state = json.loads((path / ckpt.TRAINER_STATE_NAME).read_text())
        self.step, self.samples = state["step"], state["samples"]
        self._truncate_csv(self.step)
        logger.info("resumed from %s (step %d)", path, self.step)
        data = state.get("data", [])
        rank = self.accelerator.process_index
        same_layout = (len(data) == self.accelerator.num_processes and rank < len(data)
                       and data[rank].get("num_workers") == self.stage.data.num_workers
                       and data[rank].get("batch_size") == self.stage.data.batch_size)
        if not same_layout:
            logger.warning("process count, workers or batch size changed since the checkpoint: the data "
                           "position cannot be restored exactly; the data stream restarts with a new seed")
            self._data_seed_offset = self.step
            return {}
        return data[rank]

    def _truncate_csv(self, step: int) -> None:
        """Drop scalar rows logged after the checkpoint we resume from (they will be redone)."""
        path = self.run_dir / "metrics.csv"
        if not self.accelerator.is_main_process or not path.is_file():
            return
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.csv_fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    # -- logging -----------------------------------------------------------------------------
    def _open_logs(self):
        if not self.accelerator.is_main_process:
            return None, None
        path = self.run_dir / "metrics.csv"
        new = not path.is_file()
        csv_file = path.open("a", newline="")
        writer = csv.DictWriter(csv_file, fieldnames=self.csv_fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.step + 1 if self.step else None)
        except ImportError:
            logger.warning("tensorboard is not installed; scalars go to metrics.csv only")
            tb = None
        return (csv_file, writer), tb

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        acc, stage = self.accelerator, self.stage
        self._data_seed_offset = 0
        self._build()
        # one column per weighted loss next to the total (`loss_itc`, ...), so a curve per objective
        self.csv_fields = (*CSV_FIELDS, *(f"loss_{n}" for n in self.loss_names))
        data_state = self._restore()
        loader = build_dataloader(stage.data, self.processor, rank=acc.process_index, world=acc.num_processes,
                                  seed=stage.run.seed + self._data_seed_offset, state=data_state,
                                  qformer_text=any(n in QFORMER_LOSSES for n in self.loss_names))
        self.data_batches = int(data_state.get("batches", 0))
        self.positions = {int(k): v for k, v in data_state.get("positions", {}).items()}
        self.skipped = {int(k): v for k, v in data_state.get("skipped", {}).items()}
        (csv_pair, tb) = self._open_logs()
        from tqdm.auto import tqdm

        bar = tqdm(total=self.stop_at, initial=self.step, desc=stage.stage, unit="step", dynamic_ncols=True,
                   disable=not (acc.is_main_process and stage.run.progress_bar))
        batches = iter(loader)
        start = time.perf_counter()
        last = {}
        try:
            while self.step < self.stop_at:
                last = self._train_step(batches)
                self.step += 1
                self.samples += last["global_batch"]
                if acc.is_main_process:
                    row = {"step": self.step, "loss": f"{last['loss']:.6f}", "lr": f"{last['lr']:.6g}",
                           "grad_norm": f"{last['grad_norm']:.6f}", "samples_per_s": f"{last['samples_per_s']:.2f}",
                           "samples": self.samples, "skipped": last["skipped"],
                           "elapsed_s": f"{time.perf_counter() - start:.2f}",
                           **{f"loss_{n}": f"{v:.6f}" for n, v in last["losses"].items()}}
                    if self.step % stage.run.log_every == 0 or self.step == self.stop_at:
                        csv_pair[1].writerow(row)
                        csv_pair[0].flush()
                        if tb is not None:
                            for key in ("loss", "lr", "grad_norm", "samples_per_s", "skipped",
                                        *(f"loss_{n}" for n in last["losses"])):
                                tb.add_scalar(f"train/{key}", float(row[key]), self.step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}",
                                    samples_s=f"{last['samples_per_s']:.1f}", skipped=last["skipped"])
                if self.step % stage.run.save_every == 0 or self.step == self.stop_at:
                    self.save()
            if self.step >= stage.schedule.total_steps:
                self.export(self.run_dir / "model")
        finally:
            bar.close()
            if csv_pair:
                csv_pair[0].close()
            if tb is not None:
                tb.close()
            del batches  # stops dataloader workers
            if self._log_file is not None:
                logger.removeHandler(self._log_file)
                self._log_file.close()
        acc.wait_for_everyone()
        return {"step": self.step, "samples": self.samples, "loss": last.get("loss"), "losses": last.get("losses"),
                "run_dir": str(self.run_dir)}

    def _train_step(self, batches) -> dict:
        acc, stage = self.accelerator, self.stage
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(stage.optim.grad_accum)]
        for batch in micro:
            self.data_batches += 1
            self.positions[batch["_worker"]] = batch["_position"]
            self.skipped[batch["_worker"]] = batch["_skipped"]
        # Target tokens of the whole global batch (labels are shifted by one inside the LM loss).
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        global_tokens = acc.reduce(torch.tensor(float(local_tokens), device=acc.device), reduction="sum").item()
        names = self.loss_names
        part_sums = torch.zeros(len(names), device=acc.device)
        extra = {"num_items_in_batch": max(global_tokens, 1.0)} if "lm" in names else {}
        for i, batch in enumerate(micro):
            inputs = {k: (v.to(acc.device) if torch.is_tensor(v) else v) for k, v in batch.items()
                      if k in (*MODEL_INPUTS, *OPTIONAL_MODEL_INPUTS)}
            last_micro = i == len(micro) - 1
            sync = nullcontext() if last_micro else acc.no_sync(self.model)
            with sync:
                with acc.autocast():
                    out = self.model(**inputs, loss_names=names, **extra)
                # Each part as its share of the global value: token losses are already divided by the
                # global token count; mean losses are averaged over micro-batches and processes.
                shares = torch.stack([
                    out.losses[n] if n in TOKEN_LOSSES else out.losses[n] / (len(micro) * acc.num_processes)
                    if n in out.losses else torch.zeros((), device=acc.device) for n in names])
                weights = torch.tensor([stage.losses[n] for n in names], device=acc.device)
                loss = (shares * weights).sum()
                self._check_finite(loss, i, batch["keys"])
                # DDP/FSDP average gradients over processes; scale so the result is the global mean.
                if loss.requires_grad:
                    acc.backward(loss * acc.num_processes)
            part_sums += shares.detach().float()
        grad_norm = float("nan")
        if stage.optim.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), stage.optim.max_grad_norm))
            # The norm is computed from synchronised gradients, so every process takes this branch alike.
            # (Under fp16 the grad scaler handles overflow itself by skipping the step.)
            if acc.scaler is None and not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"non-finite gradient norm ({grad_norm}) at step {self.step + 1} on samples "
                                         f"{[k for b in micro for k in b['keys']]}; nothing was updated; last good "
                                         f"checkpoint: {ckpt.latest_checkpoint(self.ckpt_root) or 'none'}")
        lr = self.scheduler.get_last_lr()[0] / self.optimizer.param_groups[0]["lr_mult"]
        self.optimizer.step()
        if not acc.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped; so does the schedule
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        skipped_local = sum(sum(c.values()) for c in self.skipped.values())
        stats = acc.reduce(torch.cat([part_sums, torch.tensor([float(skipped_local)], device=acc.device)]),
                           reduction="sum")
        parts = {n: stats[k].item() for k, n in enumerate(names)}
        global_batch = len(micro) * micro[0]["input_ids"].shape[0] * acc.num_processes
        return {"loss": sum(stage.losses[n] * v for n, v in parts.items()), "losses": parts,
                "skipped": int(stats[-1].item()), "lr": lr, "grad_norm": grad_norm,
                "global_batch": global_batch, "samples_per_s": global_batch / (time.perf_counter() - t0)}

    def _check_finite(self, loss: torch.Tensor, micro_index: int, keys: list[str]) -> None:
        """Collective: all processes learn whether any has a non-finite loss and stop together
        (one rank raising alone would leave the others waiting in the next all-reduce)."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        bad = torch.tensor(0.0 if torch.isfinite(loss).item() else 1.0, device=acc.device)
        if acc.reduce(bad, reduction="sum").item() == 0:
            return
        reports = gather_object([{"rank": acc.process_index, "loss": float(loss.item()), "keys": keys}])
        culprits = [r for r in reports if not math.isfinite(r["loss"])]
        last_good = ckpt.latest_checkpoint(self.ckpt_root)
        message = (f"non-finite loss at step {self.step + 1} (micro-batch {micro_index}): "
                   + "; ".join(f"rank {r['rank']} loss {r['loss']} on samples {r['keys']}" for r in culprits)
                   + f". Nothing was updated; last good checkpoint: {last_good or 'none'}")
        if acc.is_main_process:
            ckpt.write_json(self.run_dir / "nonfinite_batch.json",
                            {"step": self.step + 1, "micro_batch": micro_index, "reports": culprits})
            logger.error(message)
        raise NonFiniteLossError(message)

    # -- saving ------------------------------------------------------------------------------
    def _data_state(self) -> dict:
        return {"batches": self.data_batches, "positions": {str(k): v for k, v in self.positions.items()},
                "skipped": {str(k): v for k, v in self.skipped.items()},
                "num_workers": self.stage.data.num_workers, "batch_size": self.stage.data.batch_size}

    def save(self) -> Path | None:
        from accelerate.utils import gather_object

        acc = self.accelerator
        trainable = self._trainable_state()
        # Every process reports its data position and a checksum of its parameters; differing
        # checksums would mean the processes drifted apart (they must not under DDP).
        per_rank = gather_object([{"data": self._data_state(),
                                   "checksum": None if self.sharded else _checksum(trainable)}])
        trainer_state = {"step": self.step, "samples": self.samples, "stage": self.stage.stage,
                         "num_processes": acc.num_processes, "data": [r["data"] for r in per_rank],
                         "param_checksums": [r["checksum"] for r in per_rank]}
        if len({r["checksum"] for r in per_rank}) > 1:
            logger.error("parameters differ between processes at step %d: %s", self.step,
                         trainer_state["param_checksums"])
        path = ckpt.save_checkpoint(acc, self.ckpt_root, self.step, trainable if acc.is_main_process else None,
                                    trainer_state, self.stage.model, self.stage.run.keep_last)
        if path is not None:
            logger.info("saved %s", path)
        return path

    def export(self, out: Path) -> None:
        """The finished stage as a normal model directory (`from_pretrained`, `mmbridge chat`, the next
        stage's `model:`). With all frozen components referenced by path it is the small artifact."""
        acc = self.accelerator
        trainable = self._trainable_state()
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.model)
        tmp = out.with_name(f".{out.name}.partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        paths = model.config.component_paths
        small = all(model.config.trainable[c] or c in paths for c in model.config.components)
        if self.sharded:
            if not small:
                raise ValueError("exporting a sharded (FSDP/DeepSpeed) run needs every frozen component "
                                 "referenced by config.component_paths")
            tmp.mkdir(parents=True)
            model.config.save_pretrained(tmp)
            ckpt.save_trainable(trainable, tmp / ckpt.TRAINABLE_NAME, {})
        else:
            model.save_pretrained(tmp, trainable_only=small)
        self.processor.save_pretrained(tmp)
        ckpt._fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        logger.info("exported the trained model to %s", out)


def train(stage: StageConfig, run_dir: str | os.PathLike, *, resume: bool = False,
          max_steps: int | None = None) -> dict:
    return Trainer(stage, run_dir, resume=resume, max_steps=max_steps).fit()


__all__ = ["Trainer", "train", "NonFiniteLossError", "param_groups"]
