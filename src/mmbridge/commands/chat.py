"""`mmbridge chat`: one answer (`--prompt`) or an interactive multi-turn session, streamed."""

from __future__ import annotations

import argparse
import sys

HELP = """Interactive commands: /image PATH (attach to your next message), /reset, /quit."""


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=128)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    group.add_argument("--top-p", type=float, default=0.9)
    group.add_argument("--num-beams", type=int, default=1)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=None)


def sampling_options(args):
    from mmbridge.generation import SamplingOptions

    return SamplingOptions(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                           temperature=args.temperature or 1.0, top_p=args.top_p, num_beams=args.num_beams,
                           repetition_penalty=args.repetition_penalty, seed=args.seed)


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """--dtype, --quantize, --merge-adapters: how the model is loaded for decoding (`mmbridge bench` measures
    each). The static KV cache and torch.compile stay Python options: on CPU they did not pay (docs/speed.md)."""
    group = parser.add_argument_group("decoding")
    group.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="weights dtype (bfloat16: half the bytes per token; fast on CPUs with avx512_bf16)")
    # = modeling.quantize.QUANTIZE_CHOICES (a test checks it), written out: importing it imports torch
    group.add_argument("--quantize", choices=["int8", "int8-g32"], default=None,
                       help="int8 weight-only LLM linears, a quarter of fp32's bytes per token: int8 = one scale "
                            "per row (fastest), int8-g32 = one per 32 columns (closer to fp32; compiles its "
                            "kernel on first use)")
    group.add_argument("--merge-adapters", action="store_true",
                       help="merge LoRA adapters / trained token rows into the LLM's weights before decoding")


def load_pipeline(model: str, dtype: str = "float32", quantize: str | None = None, merge_adapters: bool = False):
    """Resolve a name or dir and load it, turning missing/unknown models into CLI errors."""
    import torch
    from transformers.utils import logging as hf_logging

    from mmbridge.cli import CLIError
    from mmbridge.generation import MMBridgePipeline
    from mmbridge.models import resolve_model_path

    hf_logging.disable_progress_bar()  # a chat prompt should not start with a weight-loading bar

    try:
        path = resolve_model_path(model)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    try:
        return MMBridgePipeline.from_pretrained(path, dtype=getattr(torch, dtype), quantize=quantize,
                                                merge_adapters=merge_adapters)
    except Exception as err:  # corrupt/truncated weights, unreadable disk: one line naming the file
        from mmbridge.interop.loading import explain_load_error

        line = explain_load_error(path, err)
        if line is None:
            raise
        raise CLIError(line) from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("chat", help="chat about images with a model",
                                   description="Chat about images. " + HELP)
    parser.add_argument("--model", default="shapes", help="model directory or shipped name (default: shapes)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="image for the first message (repeat for several)")
    parser.add_argument("--prompt", help="ask this, print the answer and exit")
    parser.add_argument("--system", help="system message")
    add_decode_arguments(parser)
    parser.add_argument("--out", default="mmbridge-outputs", metavar="DIR",
                        help="where images the model draws are saved, with chat.md (default: mmbridge-outputs)")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def _stream_turn(session, text, images, options, outputs=None, seen=None) -> None:
    """One streamed turn; `seen` is the image the session looks at (the overlays of what the act head finds)."""
    from mmbridge.generation import part_to_text

    stream = session.ask_stream(text, images=images, **vars(options))
    while True:
        try:
            print(next(stream), end="", flush=True)
        except StopIteration as done:
            result = done.value
            break
    print()
    if outputs is not None and any(part.type != "text" for part in result.parts):
        for path in outputs.write(text, result, seen):  # images and other head outputs, saved
            print(f"  saved {path}")
    else:
        for part in result.parts:
            if part.type != "text":
                print(part_to_text(part))


def run(args) -> int:
    from mmbridge.cli import CLIError
    from mmbridge.processing import ImageLoadError, load_image

    try:
        images = [load_image(path) for path in args.image]
    except ImageLoadError as err:
        raise CLIError(str(err)) from None
    pipeline = load_pipeline(args.model, args.dtype, args.quantize, args.merge_adapters)
    options = sampling_options(args)
    session = pipeline.chat(system=args.system)
    from mmbridge.commands.outputs import OutputWriter

    outputs = OutputWriter(args.out)
    seen = images[-1] if images else None
    if args.prompt is not None:
        _stream_turn(session, args.prompt, images, options, outputs, seen)
        return 0

    print(HELP, file=sys.stderr)
    pending = images
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            pending, seen = [], None
            continue
        if line.startswith("/image "):
            try:
                pending.append(load_image(line.split(" ", 1)[1].strip()))
                seen = pending[-1]
            except ImageLoadError as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        print("model> ", end="", flush=True)
        try:
            _stream_turn(session, line, pending, options, outputs, seen)
        except ValueError as err:
            print(f"\nerror: {err}", file=sys.stderr)
        pending = []
