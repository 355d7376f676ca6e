"""`mmbridge export blip2 --model M --out DIR [--merge-lora]`: a see-model as a transformers model dir.

Writes `Blip2ForConditionalGeneration` (or `InstructBlipForConditionalGeneration` for an instruction-aware
Q-Former) with processor and tokenizer; what the class cannot hold is refused, or left out and named
(docs/scale.md, docs/interop.md).
"""

from __future__ import annotations

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a model for the engines people scale on (transformers BLIP-2 / InstructBLIP)",
        description="Export an mmbridge model as a standard transformers model dir that from_pretrained loads and "
                    "vLLM / TGI / SGLang serve.")
    kinds = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    blip2 = kinds.add_parser(
        "blip2", help="Blip2ForConditionalGeneration (InstructBlipForConditionalGeneration for an "
                      "instruction-aware Q-Former)")
    blip2.add_argument("--model", required=True, help="model directory or shipped name")
    blip2.add_argument("--out", required=True, metavar="DIR")
    blip2.add_argument("--merge-lora", action="store_true",
                       help="merge the LLM's LoRA adapters into its exported weights (peft merge_and_unload)")
    blip2.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                       help="dtype of the written weights (default: as loaded, float32)")
    blip2.add_argument("--force", action="store_true", help="write into a non-empty --out dir")
    blip2.set_defaults(func=_export_blip2)


def _export_blip2(args) -> int:
    from pathlib import Path

    from mmbridge.cli import CLIError
    from mmbridge.interop.export import export_blip2
    from mmbridge.interop.loading import resolve_dtype
    from mmbridge.models import resolve_model_path

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CLIError(f"{out} exists and is not empty (use --force to write into it)")
    try:
        summary = export_blip2(resolve_model_path(args.model), out, merge_lora=args.merge_lora,
                               dtype=resolve_dtype(args.dtype))
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise CLIError(" ".join(str(err).strip("'\"").split())) from err
    print(f"wrote {out}: {summary['class']}, {summary['keys']} tensors, {summary['bytes'] / 1024**2:.1f} MiB")
    for item in summary["left_out"]:
        print(f"  left out: {item}")
    for note in summary["notes"]:
        print(f"  note: {note}")
    return 0
