"""Typed stage configs: one YAML file declares a training stage (what trains, on which data, how long).

A stage is data, not code: MiniGPT-4's stage 1 and stage 2 differ only in their YAML. Everything is
validated up front — unknown keys (with a "did you mean"), unknown components, wrong types, missing
model or data paths — so a typo fails in a second instead of after the model has loaded.

Relative paths are resolved against the YAML file's directory, so recipes can ship next to their data.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmbridge.config import BASE_LOSSES, COMPONENTS, QFORMER_LOSSES
from mmbridge.heads_config import HEAD_CONFIGS


#: Losses a stage can ask for, by name: the LM's, BLIP-2 stage 1's, and every registered head kind's.
#: Which of them a given model reports is checked against its config (`MMBridgeConfig.loss_names`).
def known_losses() -> tuple[str, ...]:
    return (*BASE_LOSSES, *QFORMER_LOSSES, *(n for cls in HEAD_CONFIGS.values() for n in cls.loss_names))


KNOWN_LOSSES = known_losses()
DATASET_TYPES = ("webdataset", "llava_json")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


class ConfigError(ValueError):
    """The stage config is wrong; the message names the key and what is expected."""


@dataclass
class DatasetConfig:
    name: str
    type: str  # "webdataset" (tar shards key.png+key.txt+key.json) or "llava_json"
    shards: list[str] | None = None  # webdataset: brace patterns / globs / paths
    path: str | None = None  # llava_json: the JSON file
    image_root: str | None = None  # llava_json: where "image" paths point (default: the JSON's folder)
    weight: float = 1.0  # sampling ratio in the mix (MiniGPT-4: laion 115, cc_sbu 14)
    prompts: list[str] = field(default_factory=lambda: ["Describe the image."])  # for caption samples
    shuffle_buffer: int = 1000  # webdataset: samples held for shuffling
    split: str = "auto"  # webdataset: across readers by "shards", by "samples", or "auto"
    # When the stage weights a Q-Former loss (itc/itm/itg): pair each image with its sample's answer text.
    # False for chats whose answers are no caption of the image (their rows then train the LM loss only).
    qformer_text: bool = True


@dataclass
class DataConfig:
    datasets: list[DatasetConfig]
    batch_size: int = 8  # per process and micro-step; global batch = batch_size * processes * grad_accum
    num_workers: int = 0
    max_length: int | None = None  # tokens, MiniGPT-4's max_txt_len (text is cut from the end)


@dataclass
class ScheduleConfig:
    """Linear-warmup cosine, as MiniGPT-4 / BLIP-2 (LAVIS `linear_warmup_cosine_lr`)."""

    total_steps: int  # optimizer steps of the whole stage (the cosine ends here)
    init_lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 0
    iters_per_epoch: int | None = None  # set to step the cosine once per epoch, exactly like LAVIS


@dataclass
class OptimConfig:
    weight_decay: float = 0.05  # AdamW; biases and norm weights are never decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    lr_mult: dict[str, float] = field(default_factory=dict)  # component -> multiplier of the lr


@dataclass
class RunConfig:
    seed: int = 42
    mixed_precision: str = "auto"  # auto: bf16 on CUDA GPUs that support it, else fp32
    save_every: int = 1000  # optimizer steps between checkpoints (a final one is always written)
    keep_last: int = 2  # complete checkpoints kept on disk
    log_every: int = 1  # steps between scalar rows (TensorBoard + CSV)
    find_unused_parameters: bool = False  # DDP: needed when some batches skip a component (text-only data)
    progress_bar: bool = True


@dataclass
class StageConfig:
    stage: str  # a name for logs and the run directory
    model: str  # mmbridge model directory (from_pretrained); the previous stage's `RUN/model` works
    train: list[str]  # components that train; the others are frozen
    data: DataConfig
    schedule: ScheduleConfig
    losses: dict[str, float] = field(default_factory=lambda: {"lm": 1.0})
    # LoRA adapters on the frozen LLM (peft LoraConfig arguments: r, lora_alpha, target_modules, ...):
    # added if the model has none, and trained with this stage. Without it, adapters a model already
    # has stay frozen.
    llm_lora: dict | None = None
    # The added special tokens whose LLM rows train (exact names, or a prefix ending in "*": ["[EDIT]",
    # "[EDIT_Q*"]); the other added rows stay as they are. None: every added row trains. A stage that extends a
    # trained head needs it: without the other routes' chats in its mix their rows drift (run k3 lost its
    # grounding and pose routing to an edit stage).
    token_rows: list[str] | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- building dataclasses from plain dicts, with errors that name the key -------------------------

def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item is str:
            value = [value]  # a single shard pattern / prompt may be written without a list
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_check_type(k, key_tp, where): _check_type(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-4" (no dot) as a string; accept numeric strings.
            try:
                return float(value) if isinstance(value, str) else _fail(where, "a number", value)
            except ValueError:
                _fail(where, "a number", value)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            _fail(where, "an integer", value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, "true or false", value)
        return value
    if tp is str:
        if not isinstance(value, str):
            _fail(where, "a string", value)
        return value
    return value


def _fail(where: str, expected: str, value: Any):
    raise ConfigError(f"{where}: expected {expected}, got {value!r}")


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(fields)}"
        raise ConfigError(f"unknown key {_join(where, key)!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _check_type(_onto_default(f, raw[name]), hints[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {_join(where, name)!r}")
    return cls(**kwargs)


def _onto_default(f: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a field whose default is a dataclass instance fills what it leaves out from that
    instance, not from the class: `act_edit.overrides=[…]` keeps the recipe's `act_edit.config`."""
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if not (isinstance(value, dict) and dataclasses.is_dataclass(default) and not isinstance(default, type)):
        return value
    return _merged(dataclasses.asdict(default), value)


def _merged(base: dict, value: dict) -> dict:
    return {**base, **{k: _merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in value.items()}}


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


# -- overrides: "schedule.init_lr=3e-5", "data.datasets.0.weight=2" --------------------------------

def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. schedule.init_lr=3e-5)")
        dotted, text = item.split("=", 1)
        value = yaml.safe_load(text) if text else None  # typed like YAML: 3 -> int, 1.0e-4 -> float, [a,b] -> list
        node = raw
        parts = dotted.split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[_index(node, part, dotted)]
            else:
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list) and last == str(len(node)):  # one past the end: appended (a dataset to the mix)
            node.append(value)
        elif isinstance(node, list):
            node[_index(node, last, dotted)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:-1])} is not a mapping")
    return raw


def _index(node: list, part: str, dotted: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {dotted!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


# -- loading + semantic validation ----------------------------------------------------------------

def expand_shards(patterns: list[str]) -> list[str]:
    """Brace patterns (`data/{000..009}.tar`) and globs -> sorted existing paths (or URLs, kept as is)."""
    import braceexpand  # a webdataset dependency

    out = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            if "://" in item or item.startswith("pipe:"):
                out.append(item)  # remote shards are streamed by webdataset; not checked here
            elif any(ch in item for ch in "*?["):
                out.extend(sorted(glob.glob(item)))
            else:
                out.append(item)
    return out


def load_stage_config(path: str | os.PathLike, overrides: list[str] | None = None,
                      check_paths: bool = True) -> StageConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (stage, model, train, data, ...)")
    _absolute_raw_paths(raw, path.parent)  # the file's own paths are relative to the file ...
    raw = apply_overrides(raw, list(overrides or []))
    cfg = _build(StageConfig, raw, "")
    resolve_paths(cfg, Path.cwd())  # ... an override's to where the command runs, as a user types them
    validate(cfg, check_paths=check_paths)
    return cfg


def _absolute_raw_paths(raw: dict, base: Path) -> None:
    """`resolve_paths` on a stage file's raw mapping (before overrides join it)."""
    if isinstance(raw.get("model"), str):
        raw["model"] = _absolute(raw["model"], base)
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    for ds in data.get("datasets") or []:
        if not isinstance(ds, dict):
            continue
        for key in ("path", "image_root"):
            if isinstance(ds.get(key), str):
                ds[key] = _absolute(ds[key], base)
        shards = ds.get("shards")
        if isinstance(shards, str):
            ds["shards"] = _absolute(shards, base)
        elif isinstance(shards, list):
            ds["shards"] = [_absolute(s, base) if isinstance(s, str) else s for s in shards]


def stage_config_from_dict(raw: dict, base_dir: str | os.PathLike = ".", check_paths: bool = True) -> StageConfig:
    cfg = _build(StageConfig, raw, "")
    resolve_paths(cfg, Path(base_dir))
    validate(cfg, check_paths=check_paths)
    return cfg


def _absolute(p: str | None, base: Path) -> str | None:
    """A relative local path made absolute against `base`; URLs, `pipe:` commands and absolute paths kept."""
    if p is None or "://" in p or p.startswith("pipe:"):
        return p
    return str((base / Path(p).expanduser()).resolve())


def resolve_paths(cfg: StageConfig, base: Path) -> None:
    cfg.model = _absolute(cfg.model, base)
    for ds in cfg.data.datasets:
        ds.path = _absolute(ds.path, base)
        ds.image_root = _absolute(ds.image_root, base)
        if ds.shards:
            ds.shards = [_absolute(s, base) for s in ds.shards]


def _model_names(cfg: StageConfig, check_paths: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(components, losses) a stage may name: the model's own when its config can be read, else the
    base components and every loss some model can report (the trainer checks again on the model)."""
    if check_paths and (Path(cfg.model) / "config.json").is_file():
        from mmbridge.config import MMBridgeConfig

        try:
            config = MMBridgeConfig.from_pretrained(cfg.model)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model: cannot read {cfg.model}/config.json: {err}") from err
        return config.components, config.loss_names
    return COMPONENTS, known_losses()


def validate(cfg: StageConfig, check_paths: bool = True) -> None:
    if check_paths and not (Path(cfg.model) / "config.json").is_file():  # first: else "unknown component(s)"
        raise ConfigError(f"model: {cfg.model} is not an mmbridge model directory (no config.json)")
    components, losses = _model_names(cfg, check_paths)
    unknown = [c for c in cfg.train if c not in components]
    if unknown:
        raise ConfigError(f"train: unknown component(s) {unknown}; known components: {list(components)}")
    if not cfg.train:
        raise ConfigError("train: list at least one component to train (e.g. [qformer, projection])")
    if cfg.token_rows is not None and not cfg.token_rows:
        raise ConfigError("token_rows: name at least one added token (or leave it out: every added row trains)")
    bad_mult = [c for c in cfg.optim.lr_mult if c not in components]
    if bad_mult:
        raise ConfigError(f"optim.lr_mult: unknown component(s) {bad_mult}; known components: {list(components)}")
    frozen_mult = [c for c in cfg.optim.lr_mult if c not in cfg.train]
    if frozen_mult:
        raise ConfigError(f"optim.lr_mult: {frozen_mult} do not train in this stage (train: {cfg.train})")
    bad_loss = [k for k in cfg.losses if k not in losses]
    if bad_loss:
        raise ConfigError(f"losses: unknown loss(es) {bad_loss}; known: {list(losses)}")
    if cfg.run.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"run.mixed_precision: {cfg.run.mixed_precision!r} is not one of {list(MIXED_PRECISION)}")
    s = cfg.schedule
    positive = {"schedule.total_steps": s.total_steps, "data.batch_size": cfg.data.batch_size,
                "optim.grad_accum": cfg.optim.grad_accum, "run.save_every": cfg.run.save_every,
                "run.keep_last": cfg.run.keep_last, "run.log_every": cfg.run.log_every}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not 0 <= s.warmup_steps <= s.total_steps:
        raise ConfigError(f"schedule.warmup_steps must be between 0 and total_steps ({s.total_steps}), "
                          f"got {s.warmup_steps}")
    if s.iters_per_epoch is not None and s.iters_per_epoch < 1:
        raise ConfigError(f"schedule.iters_per_epoch must be >= 1, got {s.iters_per_epoch}")
    if min(s.init_lr, s.min_lr, s.warmup_lr) < 0 or s.init_lr == 0:
        raise ConfigError("schedule: learning rates must be >= 0 and init_lr > 0")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas}")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets: list at least one dataset")
    names = [d.name for d in cfg.data.datasets]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.datasets: names must be unique, got {names}")
    for i, ds in enumerate(cfg.data.datasets):
        where = f"data.datasets[{i}] ({ds.name})"
        if ds.type not in DATASET_TYPES:
            raise ConfigError(f"{where}.type: {ds.type!r} is not one of {list(DATASET_TYPES)}")
        if ds.weight <= 0:
            raise ConfigError(f"{where}.weight must be > 0, got {ds.weight}")
        if ds.split not in ("auto", "shards", "samples"):
            raise ConfigError(f"{where}.split: {ds.split!r} is not one of ['auto', 'shards', 'samples']")
        if not ds.prompts:
            raise ConfigError(f"{where}.prompts: give at least one prompt")
        if ds.type == "webdataset" and not ds.shards:
            raise ConfigError(f"{where}: a webdataset needs 'shards' (e.g. data/shard-{{000..009}}.tar)")
        if ds.type == "llava_json" and not ds.path:
            raise ConfigError(f"{where}: a llava_json dataset needs 'path' (the JSON file)")
        if not check_paths:
            continue
        if ds.type == "webdataset":
            shards = expand_shards(ds.shards)
            local = [s for s in shards if "://" not in s and not s.startswith("pipe:")]
            missing = [s for s in local if not os.path.isfile(s)]
            if not shards or missing:
                raise ConfigError(f"{where}.shards: missing data path(s) {missing[:3] or ds.shards}")
        else:
            if not os.path.isfile(ds.path):
                raise ConfigError(f"{where}.path: missing data path {ds.path}")
            if ds.image_root and not os.path.isdir(ds.image_root):
                raise ConfigError(f"{where}.image_root: missing data path {ds.image_root}")
