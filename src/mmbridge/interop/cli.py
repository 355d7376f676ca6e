"""`mmbridge build` and `mmbridge import blip2|minigpt4` (heavy imports stay inside the handlers)."""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def register(subparsers) -> None:
    build = subparsers.add_parser(
        "build", help="assemble a model from local HF dirs with a fresh bridge",
        description="Compose a vision tower and a causal LM (HF dirs) with a new Q-Former + projection. By default "
                    "the frozen parts are referenced by path; --copy writes a self-contained dir.")
    build.add_argument("--vision", required=True, metavar="DIR",
                       help="vision tower dir (ViT, CLIP/SigLIP vision, or a full CLIP/SigLIP/BLIP-2 dir)")
    build.add_argument("--llm", required=True, metavar="DIR", help="causal LM dir with its tokenizer")
    build.add_argument("--qformer", metavar="DIR", help="BLIP-2 dir whose Q-Former and query tokens to start from")
    build.add_argument("--out", required=True, metavar="DIR")
    build.add_argument("--copy", action="store_true", help="copy the frozen weights instead of referencing their dirs")
    build.add_argument("--num-query-tokens", type=int, default=32)
    build.add_argument("--qformer-layers", type=int, help="layers of a fresh Q-Former (default 12, as BLIP-2)")
    build.add_argument("--qformer-hidden", type=int, help="width of a fresh Q-Former (default 768, as BLIP-2)")
    build.add_argument("--template", default="minigpt4", choices=("minigpt4", "llama2", "plain"))
    build.add_argument("--vision-feature-layer", type=int, default=None,
                       help="vision hidden state fed to the Q-Former (default: last_hidden_state, as BLIP-2)")
    build.add_argument("--drop-cls-token", action="store_true")
    build.add_argument("--seed", type=int, default=0)
    _common(build)
    build.set_defaults(func=_build)

    importer = subparsers.add_parser("import", help="convert a published checkpoint into an mmbridge model dir")
    kinds = importer.add_subparsers(dest="source", metavar="SOURCE", required=True)
    blip2 = kinds.add_parser("blip2", help="an HF Blip2ForConditionalGeneration dir (decoder-only LM)")
    blip2.add_argument("src", metavar="DIR")
    blip2.add_argument("--out", required=True, metavar="DIR")
    blip2.add_argument("--tokenizer", metavar="DIR", help="tokenizer dir, if SRC has none")
    _common(blip2)
    blip2.set_defaults(func=_import_blip2)

    minigpt4 = kinds.add_parser("minigpt4", help="MiniGPT-4: BLIP-2 vision + Q-Former, llama_proj .pth, a Llama dir")
    minigpt4.add_argument("--blip2", required=True, metavar="DIR", help="HF BLIP-2 dir (e.g. blip2-flan-t5-xxl)")
    minigpt4.add_argument("--proj", required=True, metavar="CHECKPOINT",
                          help="MiniGPT-4 checkpoint (.pth or .safetensors) with model.llama_proj.weight/bias")
    minigpt4.add_argument("--llm", required=True, metavar="DIR", help="Vicuna/Llama dir with its tokenizer")
    minigpt4.add_argument("--out", required=True, metavar="DIR")
    minigpt4.add_argument("--link-llm", action="store_true", help="reference the LLM dir instead of copying it")
    _common(minigpt4)
    minigpt4.set_defaults(func=_import_minigpt4)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="dtype of the written weights (default: as stored)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out dir")


def _run(args, convert) -> int:
    from pathlib import Path

    from mmbridge.cli import CLIError
    from mmbridge.interop.loading import resolve_dtype

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CLIError(f"{out} exists and is not empty (use --force to write into it)")
    try:
        summary = convert(resolve_dtype(args.dtype))
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:  # includes shape/unsafe-pickle errors
        raise CLIError(str(err).strip("'\"")) from err
    size = summary["bytes"] / 1024**2
    print(f"wrote {out}: {summary['keys']} tensors, {size:.1f} MiB"
          + (f"; references {summary['referenced']}" if summary.get("referenced") else ""))
    return 0


def _build(args) -> int:
    from mmbridge.interop.build import build_model

    overrides = {k: v for k, v in (("num_hidden_layers", args.qformer_layers), ("hidden_size", args.qformer_hidden))
                 if v is not None}
    return _run(args, lambda dtype: build_model(
        args.vision, args.llm, args.out, qformer=args.qformer, copy=args.copy, dtype=dtype,
        num_query_tokens=args.num_query_tokens, template=args.template, vision_feature_layer=args.vision_feature_layer,
        drop_cls_token=args.drop_cls_token, seed=args.seed, qformer_overrides=overrides or None))


def _import_blip2(args) -> int:
    from mmbridge.interop.blip2 import import_blip2

    return _run(args, lambda dtype: import_blip2(args.src, args.out, dtype=dtype, tokenizer_dir=args.tokenizer))


def _import_minigpt4(args) -> int:
    from mmbridge.interop.minigpt4 import import_minigpt4

    return _run(args, lambda dtype: import_minigpt4(args.blip2, args.proj, args.llm, args.out, dtype=dtype,
                                                    link_llm=args.link_llm))
