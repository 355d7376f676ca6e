"""`mmbridge train CONFIG.yaml --out RUN_DIR [--resume] [--max-steps N] [key=value ...]`.

Launch it as is for one process, or under `torchrun --nproc_per_node N -m mmbridge.train …` /
`accelerate launch -m mmbridge.train …` for several; accelerate reads the launcher's environment.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train one stage (YAML stage config) with accelerate",
        description="Train one stage declared in a YAML stage config. Overrides use dotted keys, e.g. "
                    "schedule.init_lr=3e-5 data.batch_size=4 data.datasets.0.weight=2.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="stage config (YAML), see src/mmbridge/recipes/; or a whole recipe: "
                                       "`shapes-foundation` (ShapesWorld's frozen stage-0 models from nothing), "
                                       "`shapes` (the bridges on that foundation), `shapes-smoke`, or a recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    parser.add_argument("--out", required=True, help="run directory (config, logs, checkpoints, final model)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest complete checkpoint in --out (from scratch if none)")
    parser.add_argument("--until", default=None, metavar="STAGE",
                        help="recipes only: stop after this stage (tokenizer, lm, lm_gate, vision, generator; "
                             "compose, data, stage1, stage2, stage3, export); run again to continue")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many optimizer steps in total (the schedule still spans "
                             "schedule.total_steps, so a later --resume continues the same curve)")
    parser.set_defaults(func=handle)
    parser.__class__ = _OverridesAnywhere


class _OverridesAnywhere(argparse.ArgumentParser):
    """argparse fills a `nargs="*"` positional only once, so `CONFIG --out DIR a=b` would reject `a=b`;
    collect `key=value` words wherever they stand."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        overrides = [e for e in extras if "=" in e and not e.startswith("-")]
        namespace.overrides = list(getattr(namespace, "overrides", None) or []) + overrides
        return namespace, [e for e in extras if e not in overrides]


def handle(args) -> int:
    from mmbridge.cli import CLIError
    from mmbridge.train.config import ConfigError, load_stage_config

    if _is_recipe(args.config):
        return _run_recipe(args)
    # Everything the user can get wrong is checked here, before torch/transformers are loaded.
    try:
        stage = load_stage_config(args.config, args.overrides)
    except ConfigError as err:
        raise CLIError(str(err)) from None
    if args.max_steps is not None and args.max_steps < 1:
        raise CLIError(f"--max-steps must be >= 1, got {args.max_steps}")

    from mmbridge.train.checkpoint import CheckpointWriteError, CorruptCheckpointError
    from mmbridge.train.trainer import NonFiniteLossError, Trainer, limit_cpu_threads

    limit_cpu_threads(stage.data.num_workers)

    try:
        trainer = Trainer(stage, args.out, resume=args.resume, max_steps=args.max_steps)
    except FileExistsError as err:
        raise CLIError(str(err)) from None
    except OSError as err:  # --out on a read-only file system, or not writable
        from mmbridge.train.checkpoint import describe_os_error

        raise CLIError(f"cannot write the run directory {args.out}: {describe_os_error(err)}") from None
    try:
        result = trainer.fit()
    except (NonFiniteLossError, CorruptCheckpointError, CheckpointWriteError) as err:
        raise CLIError(str(err)) from None
    except Exception as err:  # damaged base-model weights, a full disk or read-only --out elsewhere
        from mmbridge.interop.loading import explain_load_error

        line = explain_load_error(stage.model, err)
        if line is None:
            raise
        raise CLIError(line) from None
    if trainer.accelerator.is_main_process:
        loss = "n/a (nothing left to train)" if result["loss"] is None else f"{result['loss']:.4f}"
        print(f"stage {stage.stage}: step {result['step']}, {result['samples']} samples, "
              f"last loss {loss}; run dir {result['run_dir']}")
    return 0


def _is_recipe(config: str) -> bool:
    from pathlib import Path

    if not config.endswith((".yaml", ".yml")):
        return True  # a shipped recipe's name
    path = Path(config)
    if not path.is_file():
        return False
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(raw, dict) and "recipe" in raw


def _run_recipe(args) -> int:
    from mmbridge.cli import CLIError
    from mmbridge.pretrain.recipe import run_recipe
    from mmbridge.train.config import ConfigError

    try:
        report = run_recipe(args.config, args.out, args.overrides, until=args.until,
                            log=lambda line: print(line, flush=True))
    except ConfigError as err:
        raise CLIError(str(err)) from None
    print(f"recipe {report['recipe']}: {report['total_seconds']:.0f} s in all; report {args.out}/report.json")
    return 0
