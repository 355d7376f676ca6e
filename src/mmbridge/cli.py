"""`mmbridge …` — the command line.

Each command module exposes ``register(subparsers)``; this module only collects them. Commands live in
``mmbridge.commands`` (the data, interop and serve commands still sit beside the code they drive); a
command may import any layer, no library layer may import a command (see docs/architecture.md).
Command modules keep heavy imports (torch, transformers) inside their handlers so that
``mmbridge --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "mmbridge.commands.demo",
    "mmbridge.commands.chat",
    "mmbridge.interop.cli",  # build, import
    "mmbridge.data.cli",
    "mmbridge.commands.train",
    "mmbridge.commands.eval",
    "mmbridge.commands.export",
    "mmbridge.serve.cli",  # serve, ui
    "mmbridge.commands.bench",
)


class CLIError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmbridge",
        description="Compose frozen vision/language models into a multimodal LLM; train only the bridges.",
    )
    from mmbridge import __version__

    parser.add_argument("--version", action="version", version=f"mmbridge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real import error inside an existing module
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CLIError as err:
        print(f"mmbridge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
