"""``mmbridge data …``: generate ShapesWorld data, look at a dataset.

Imports of the data code happen inside the handlers so ``mmbridge --help`` stays instant.
"""

from __future__ import annotations

import argparse
import os

FORMAT_CHOICES = ("wds", "llava", "coco", "eval", "text", "wave2", "all")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="generate ShapesWorld data; inspect datasets",
                                   description="Generate ShapesWorld data and inspect datasets.")
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 0)

    shapes = sub.add_parser("shapes", help="render ShapesWorld scenes into dataset files",
                            description="Render ShapesWorld scenes (world spec v1, docs/world.md) and write them "
                                        "in the ecosystem formats. Same --seed/--split/--num → same files.")
    shapes.add_argument("--out", required=True, help="output directory")
    shapes.add_argument("--num", type=int, default=1000, help="number of scenes (default 1000)")
    shapes.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    shapes.add_argument("--split", choices=("train", "val", "test"), default="train")
    shapes.add_argument("--format", choices=FORMAT_CHOICES, action="append", dest="formats",
                        help="wds | llava | coco | eval | text | wave2 | all (default all; repeatable)")
    shapes.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    shapes.add_argument("--shard-size", type=int, default=1000, help="samples per webdataset shard")
    shapes.add_argument("--wave2-num", type=int, default=None,
                        help="pose/edit/story samples (default num // 10)")
    shapes.add_argument("--quiet", action="store_true", help="no progress bar")
    shapes.set_defaults(func=_shapes)

    show = sub.add_parser("show", help="contact sheet PNG of a dataset with boxes and captions",
                          description="Draw the first samples of a dataset (directory, shard, COCO, "
                                      "LLaVA or eval file) into one PNG.")
    show.add_argument("path", help="dataset directory or file")
    show.add_argument("--out", default=None, help="PNG to write (default: PATH/contact_sheet.png)")
    show.add_argument("--num", type=int, default=16, help="samples to draw (default 16)")
    show.add_argument("--cols", type=int, default=4)
    show.set_defaults(func=_show)


def _shapes(args: argparse.Namespace) -> int:
    from mmbridge.cli import CLIError

    if args.num < 1:
        raise CLIError("--num must be at least 1")
    if not 0 <= args.seed < 1 << 28:
        raise CLIError("--seed must be in [0, 2**28)")
    if args.workers is not None and args.workers < 1:
        raise CLIError("--workers must be at least 1")
    if args.shard_size < 1:
        raise CLIError("--shard-size must be at least 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out} exists and is not a directory")

    from .build import generate

    m = generate(args.out, args.num, args.seed, args.split, args.formats or ["all"], workers=args.workers,
                 shard_size=args.shard_size, wave2_num=args.wave2_num, progress=not args.quiet)
    print(f"wrote {m['num']} {m['split']} scenes ({', '.join(m['formats'])}) to {args.out} "
          f"in {m['seconds']:.1f}s; manifest: {os.path.join(args.out, f'manifest_{args.split}.json')}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from mmbridge.cli import CLIError

    if not os.path.exists(args.path) and "{" not in args.path:
        raise CLIError(f"{args.path} does not exist")
    if args.num < 1 or args.cols < 1:
        raise CLIError("--num and --cols must be at least 1")

    from .formats.common import ReadStats
    from .show import contact_sheet

    stats = ReadStats()
    try:
        sheet = contact_sheet(args.path, args.num, args.cols, stats=stats)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if sheet is None:
        raise CLIError(f"no readable samples found in {args.path}")
    out = args.out or os.path.join(args.path if os.path.isdir(args.path) else os.path.dirname(args.path) or ".",
                                   "contact_sheet.png")
    sheet.save(out)
    skipped = f" ({stats.skipped} unreadable skipped)" if stats.skipped else ""
    print(f"wrote {out}: {min(args.num, stats.read)} samples{skipped}")
    return 0
