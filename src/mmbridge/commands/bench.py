"""`mmbridge bench`: speed and memory of mmbridge next to HF `Blip2ForConditionalGeneration`, same weights.

One run builds (or reuses) a random BLIP-2 of the chosen LM size from configs, imports it with
`mmbridge import blip2`, loads both and measures, interleaved so that load from other processes
hits both alike:

- the machine's memory bandwidth (a large fp32 matrix-vector product, and a copy);
- per implementation and decode option: time to first token (image + prompt, batch 1), decode
  tokens/s at batch 1 and 8 (from the time of N new tokens minus the time of 1), the LLM bytes read per
  decoded token over the batch-1 step time as GB/s and as a % of the measured bandwidth, and greedy
  agreement with mmbridge fp32 on a fixed prompt set (`generation.decode_options.greedy_agreement`);
- the 3rd chat turn: mmbridge with KV reuse, mmbridge re-encoding, HF re-encoding (it has no sessions);
- training: samples/s of a step (bridge trainable, AdamW) on both;
- peak RSS of loading a model and answering once, per implementation and option, in a fresh process;
- optionally the full `mmbridge train` stage in 1 vs 2 processes (`--trainer`).

Medians over `--repeats`; ratios are mmbridge over HF. Writes `bench.json` and `bench.md` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

#: Llama-shaped LMs of the sizes the issue asks about; vision and Q-Former stay small (the LM dominates decode).
LLM_SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": None},
    "100m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
             "num_key_value_heads": 12, "vocab_size": 32000},
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16,
           "num_key_value_heads": 16, "vocab_size": 32000},
}
VISION = {
    "tiny": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64,
             "image_size": 32, "patch_size": 8},
    "base": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6, "intermediate_size": 1536,
             "image_size": 224, "patch_size": 16},
}
#: option -> how the mmbridge model is loaded (dtype) and what `apply_decode_options` gets.
OPTIONS = {
    "fp32": ("float32", {}),
    "bf16": ("bfloat16", {}),
    "int8": ("float32", {"quantize": "int8"}),
    "int8-g32": ("float32", {"quantize": "int8-g32"}),
    "static-cache": ("float32", {"kv_cache": "static"}),
    "bf16+static-cache": ("bfloat16", {"kv_cache": "static"}),
    "int8+static-cache": ("float32", {"quantize": "int8", "kv_cache": "static"}),
    "compile": ("float32", {"compile": True}),
    "merged": ("float32", {"merge_adapters": True}),
    "bf16+merged": ("bfloat16", {"merge_adapters": True}),
}
HF_OPTIONS = ("fp32", "bf16")
DEFAULT_OPTIONS = "fp32,bf16,int8,int8-g32,static-cache"
QUESTIONS = ("Question: What is in the image? Answer:", "Question: Describe the image in detail. Answer:")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure decode, chat, training speed and memory against HF BLIP-2 on the same weights",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
            "Example (quiet machine): mmbridge bench --llm-size 1b --out bench-1b\n"
            "Development: mmbridge bench --llm-size tiny --repeats 1 --out /tmp/bench-tiny"))
    parser.add_argument("--llm-size", choices=sorted(LLM_SIZES), default="100m", help="LM preset (default: 100m)")
    parser.add_argument("--out", default="mmbridge-bench", metavar="DIR", help="where bench.json and bench.md go")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="where the random BLIP-2 and its import are built, reused when present "
                             "(default: $TMPDIR/mmbridge-bench-SIZE)")
    parser.add_argument("--options", default=DEFAULT_OPTIONS,
                        help=f"mmbridge decode options to measure, from {','.join(OPTIONS)} "
                             f"(default: {DEFAULT_OPTIONS})")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per timed generation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--bandwidth-mib", type=int, default=None,
                        help="matrix size of the bandwidth probe (default: 1024, tiny: 64)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="timed training steps per model (default 6 at 100m, else 3)")
    parser.add_argument("--skip", default="",
                        help="comma-separated sections to skip: chat,train,memory,quality,shipped")
    parser.add_argument("--quality-images", type=int, default=4, metavar="N",
                        help="random images of the greedy-agreement prompt set, 2 questions each (default 4)")
    parser.add_argument("--quality-tokens", type=int, default=16, metavar="N",
                        help="answer tokens per prompt of the greedy-agreement set (default 16; 8 images x 32 "
                             "tokens = 512 counted tokens, where one token is 0.2 points)")
    parser.add_argument("--quality-model", default="shapes", metavar="MODEL",
                        help="a trained model (dir or shipped name) on which every option's greedy agreement and "
                             "batch-1 decode speed are measured too (default: shapes, skipped if not installed)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one batch-1 generate per variant (torch.profiler): where decode time goes")
    parser.add_argument("--trainer", action="store_true",
                        help="also run the full `mmbridge train` stage in 1 and 2 processes (minutes)")
    parser.set_defaults(func=run)


# -- building ---------------------------------------------------------------------------------------
def build_pair(work: Path, size: str, seed: int = 0) -> tuple[Path, Path]:
    """A random HF BLIP-2 dir (`work/hf`) and its mmbridge import (`work/mm`), built once per size."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessorPil
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from mmbridge.interop.blip2 import import_blip2
    from mmbridge.interop.tiny import tiny_tokenizer_with_image_token

    hf_dir, mm_dir = work / "hf", work / "mm"
    if (mm_dir / "config.json").is_file() and (hf_dir / "config.json").is_file():
        return hf_dir, mm_dir
    tokenizer = tiny_tokenizer_with_image_token()
    text = dict(LLM_SIZES[size])
    text["vocab_size"] = text["vocab_size"] or len(tokenizer)  # tiny: the tokenizer's; else 32k like Llama/OPT
    vision = VISION["tiny" if size == "tiny" else "base"]
    width = vision["hidden_size"]
    config = Blip2Config(
        vision_config=vision,
        qformer_config={"hidden_size": width, "num_hidden_layers": 2,
                        "num_attention_heads": vision["num_attention_heads"], "intermediate_size": 4 * width,
                        "cross_attention_frequency": 1, "encoder_hidden_size": width},
        text_config={"model_type": "llama", **text, "max_position_embeddings": 2048, "tie_word_embeddings": False,
                     "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
        num_query_tokens=32 if size != "tiny" else 4, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(hf_dir)
    del model
    tokenizer.save_pretrained(hf_dir)
    BlipImageProcessorPil(size={"height": vision["image_size"], "width": vision["image_size"]},
                          image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(hf_dir)
    import_blip2(hf_dir, mm_dir)
    return hf_dir, mm_dir


def load_mm(mm_dir: Path, option: str):
    import torch

    from mmbridge.generation.decode_options import apply_decode_options
    from mmbridge.modeling import MMBridgeModel

    dtype, kwargs = OPTIONS[option]
    kwargs = dict(kwargs)
    model = MMBridgeModel.from_pretrained(mm_dir, dtype=getattr(torch, dtype), quantize=kwargs.pop("quantize", None))
    return apply_decode_options(model, **kwargs).eval()


def load_hf(hf_dir: Path, option: str):
    import torch
    from transformers import Blip2ForConditionalGeneration

    dtype = torch.float32 if option == "fp32" else torch.bfloat16
    return Blip2ForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).eval()


# -- measuring --------------------------------------------------------------------------------------
def median(values) -> float:
    return float(statistics.median(values))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bandwidth(mib: int, repeats: int) -> dict:
    """GB/s of an fp32 matrix-vector product over a `mib` MiB matrix (what batch-1 decode does) and of a copy."""
    import torch

    rows = mib * 2**20 // 4 // 4096
    matrix, vector = torch.randn(rows, 4096), torch.randn(4096)
    torch.mv(matrix, vector)
    mv = [timed(lambda: torch.mv(matrix, vector)) for _ in range(max(repeats, 3))]
    source = torch.randn(rows * 4096)
    target = torch.empty_like(source)
    target.copy_(source)
    copy = [timed(lambda: target.copy_(source)) for _ in range(max(repeats, 3))]
    nbytes = matrix.numel() * 4
    return {"matrix_mib": mib, "matvec_gb_s": round(nbytes / median(mv) / 1e9, 2),
            "copy_gb_s": round(2 * nbytes / median(copy) / 1e9, 2)}


def inputs_for(processor, images, batch: int, question: str = QUESTIONS[1]) -> dict:
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]] * batch
    batch_inputs = processor(conversations, images=images[:batch], add_generation_prompt=True)
    return {k: batch_inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}


def generate_fn(model, inputs: dict, new_tokens: int, pad_token_id: int, **extra):
    """A greedy `generate` of exactly `new_tokens` (EOS suppressed); `extra`: more `generate` arguments."""
    import torch

    def run():
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=pad_token_id, **extra)
    return run


def clocked(model, inputs: dict, new_tokens: int, pad_token_id: int, **extra) -> tuple[float, float]:
    """(time to the first token, median time of the later decode steps) of one `generate`, from a stopping
    criterion that only reads the clock (transformers calls it once per generated token)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    clock = Clock()
    start = time.perf_counter()
    generate_fn(model, inputs, new_tokens, pad_token_id, stopping_criteria=StoppingCriteriaList([clock]), **extra)()
    steps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    return clock.times[0] - start, median(steps)


def load_variants(mm_dir: Path, hf_dir: Path, options: list[str]) -> dict:
    """(impl, option) -> (model, extra `generate` arguments). Options that differ only in generation
    settings (KV cache, compile) share the weights of the model they apply to, so a 1 B run holds each
    dtype once."""
    loaded: dict = {}
    variants = {("hf", o): (load_hf(hf_dir, o), {}) for o in HF_OPTIONS}
    for option in options:
        dtype, kwargs = OPTIONS[option]
        weights = (dtype, kwargs.get("quantize"), kwargs.get("merge_adapters", False))
        if weights not in loaded:
            model = load_mm(mm_dir, option)
            if kwargs.get("kv_cache") or kwargs.get("compile"):  # shared: the settings go to `generate` instead
                model.llm.model.generation_config.cache_implementation = None
                model.llm.model.generation_config.compile_config = None
            loaded[weights] = model
        variants[("mmbridge", option)] = (loaded[weights], generation_settings(kwargs))
    return variants


def generation_settings(kwargs: dict) -> dict:
    """The `generate` arguments of the KV-cache / compile options (what `apply_decode_options` sets on the
    generation config)."""
    if kwargs.get("compile"):
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config._compile_all_devices = True
        return {"cache_implementation": "static", "compile_config": config}
    if kwargs.get("kv_cache") == "static":
        return {"cache_implementation": "static", "disable_compile": True}
    return {}


def decode_rows(models: dict, processor, images, args, bandwidth_gb_s: float) -> list[dict]:
    """TTFT and decode tok/s at batch 1 and 8 for every variant, repeats interleaved across variants."""
    from mmbridge.generation.decode_options import llm_bytes_per_token

    pad = processor.tokenizer.pad_token_id
    one, eight = inputs_for(processor, images, 1), inputs_for(processor, images, 8)
    times = {key: {"ttft": [], "b1": [], "b8": []} for key in models}
    for model, extra in models.values():  # warm-up; compilation, for the compile option, at the timed shapes
        warm = args.new_tokens if "compile_config" in extra else 3  # (the static cache's length is part of them)
        generate_fn(model, one, warm, pad, **extra)()
        generate_fn(model, eight, warm, pad, **extra)()
    for _ in range(args.repeats):
        for key, (model, extra) in models.items():
            ttft, step = clocked(model, one, args.new_tokens, pad, **extra)
            times[key]["ttft"].append(ttft)
            times[key]["b1"].append(step)
            times[key]["b8"].append(clocked(model, eight, args.new_tokens, pad, **extra)[1])
    rows = []
    for (impl, option), (model, _) in models.items():
        t = times[(impl, option)]
        b1, b8 = 1 / median(t["b1"]), 8 / median(t["b8"])
        language_model = model.llm.model if impl == "mmbridge" else model.language_model
        nbytes = llm_bytes_per_token(language_model)
        achieved = nbytes * b1 / 1e9
        rows.append({"impl": impl, "option": option, "ttft_ms": round(median(t["ttft"]) * 1e3, 2),
                     "decode_tok_s_b1": round(b1, 2), "decode_tok_s_b8": round(b8, 2),
                     "llm_bytes_per_token": nbytes, "decode_gb_s": round(achieved, 2),
                     "bandwidth_pct": round(100 * achieved / bandwidth_gb_s, 1)})
    reference = {r["option"]: r for r in rows if r["impl"] == "hf"}
    for row in rows:
        if row["impl"] != "mmbridge":
            continue
        for base, ref in reference.items():
            row[f"vs_hf_{base}"] = {"ttft": round(ref["ttft_ms"] / row["ttft_ms"], 3),
                                    "decode_b1": round(row["decode_tok_s_b1"] / ref["decode_tok_s_b1"], 3),
                                    "decode_b8": round(row["decode_tok_s_b8"] / ref["decode_tok_s_b8"], 3)}
    return rows


def profile_rows(models: dict, processor, images, new_tokens: int, top: int = 8) -> dict:
    """Per variant: the operators taking most self CPU time in one batch-1 `generate`, as % of the total."""
    from torch.profiler import ProfilerActivity, profile

    one = inputs_for(processor, images, 1)
    pad = processor.tokenizer.pad_token_id
    result = {}
    for (impl, option), (model, extra) in models.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate_fn(model, one, new_tokens, pad, **extra)()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) or 1
        ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        result[f"{impl} {option}"] = [{"op": e.key, "self_cpu_pct": round(100 * e.self_cpu_time_total / total, 1),
                                       "calls": e.count} for e in ranked]
    return result


def quality(models: dict, processor, images, new_tokens: int) -> dict:
    """Greedy agreement of every mmbridge option with mmbridge fp32 on the fixed prompt set: every image of
    `images` with both questions, answers of up to `new_tokens`."""
    from mmbridge.generation.decode_options import greedy_agreement, prompt_batches

    reference = models[("mmbridge", "fp32")][0]
    batches = prompt_batches(processor, images, QUESTIONS, batch_size=4)
    batches = [{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")} for b in batches]
    return {option: {k: round(v, 4) if isinstance(v, float) else v
                     for k, v in greedy_agreement(reference, model, batches, new_tokens, **extra).items()}
            for (impl, option), (model, extra) in models.items() if impl == "mmbridge" and option != "fp32"}


def trained_model_rows(name: str, options: list[str], repeats: int, new_tokens: int) -> dict:
    """Every option on a trained model (the shipped one by default): greedy agreement with its fp32 on its
    sample images, and batch-1 decode tok/s, repeats interleaved. Adapter merging is measured too, as
    mmbridge-trained models carry LoRA adapters / trainable token rows."""
    import numpy as np
    from PIL import Image

    from mmbridge.generation.decode_options import MODEL_INPUTS, greedy_agreement, prompt_batches
    from mmbridge.models import resolve_model_path, sample_images_dir
    from mmbridge.processing import MMBridgeProcessor

    path = resolve_model_path(name)
    processor = MMBridgeProcessor.from_pretrained(path)
    images = [np.array(Image.open(p).convert("RGB")) for p in sorted(sample_images_dir().glob("test-*.png"))[:4]]
    if len(images) < 4:
        rng = np.random.default_rng(0)
        images += [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(4 - len(images))]
    batches = prompt_batches(processor, images, ["How many shapes are there?", "Describe the image."], 4)
    batches = [{k: b[k] for k in MODEL_INPUTS if k in b} for b in batches]
    names = list(dict.fromkeys(["fp32", *[o for o in options if o != "compile"], "merged", "bf16+merged"]))
    models = {o: load_mm(path, o) for o in names}
    one = {k: v[:1] for k, v in batches[0].items()}
    pad = processor.tokenizer.pad_token_id
    for model in models.values():
        generate_fn(model, one, 3, pad)()
    times = {o: [] for o in models}
    for _ in range(repeats):
        for option, model in models.items():
            times[option].append(clocked(model, one, new_tokens, pad)[1])
    rows = []
    for option, model in models.items():
        row = {"option": option, "decode_tok_s_b1": round(1 / median(times[option]), 2)}
        if option != "fp32":
            row.update({k: round(v, 4) if isinstance(v, float) else v
                        for k, v in greedy_agreement(models["fp32"], model, batches, 16).items()})
        rows.append(row)
    base = rows[0]["decode_tok_s_b1"]
    for row in rows:
        row["vs_fp32"] = round(row["decode_tok_s_b1"] / base, 3) if base and row["decode_tok_s_b1"] else None
    return {"model": str(name), "llm_params_m": round(sum(p.numel() for p in models["fp32"].llm.parameters()) / 1e6, 1),
            "rows": rows}


def chat_turns(mm_model, hf_model, processor, images, args) -> dict:
    """Latency of the 3rd turn of a chat (first token, and a full answer)."""
    import torch

    from mmbridge.generation import MMBridgePipeline

    pipeline = MMBridgePipeline(mm_model, processor)
    turns = ["Question: What is in the image? Answer:", "Question: Describe it in detail. Answer:",
             "Question: And the colors? Answer:"]
    pad = processor.tokenizer.pad_token_id
    result = {}
    for new_tokens in (1, min(16, args.new_tokens)):
        samples = {"mmbridge_reuse": [], "mmbridge_reencode": [], "hf_reencode": []}
        for _ in range(args.repeats):
            for reuse in (True, False):
                session = pipeline.chat(max_new_tokens=16, reuse_cache=reuse)
                session.ask(turns[0], images=[images[0]])
                session.ask(turns[1])
                samples["mmbridge_reuse" if reuse else "mmbridge_reencode"].append(
                    timed(lambda s=session, n=new_tokens: s.ask(turns[2], max_new_tokens=n)))
            history = session.messages[:-1]  # the first two turns, answers included, and the third question
            inputs = processor(history, images=[images[0]], add_generation_prompt=True)
            inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values")}
            with torch.no_grad():
                samples["hf_reencode"].append(timed(lambda i=inputs, n=new_tokens: hf_model.generate(
                    **i, max_new_tokens=n, do_sample=False, pad_token_id=pad,
                    eos_token_id=processor.tokenizer.eos_token_id)))
        med = {k: round(median(v) * 1e3, 2) for k, v in samples.items()}
        result[f"{new_tokens}_tokens_ms"] = {
            **med, "reuse_speedup": round(med["mmbridge_reencode"] / med["mmbridge_reuse"], 2),
            "vs_hf": round(med["hf_reencode"] / med["mmbridge_reuse"], 2)}
    return result


def train_rates(mm_dir: Path, hf_dir: Path, processor, images, steps: int) -> dict:
    """Samples/s of a training step (bridge trainable, AdamW, batch 8) of both, interleaved."""
    import torch

    mm, hf = load_mm(mm_dir, "fp32"), load_hf(hf_dir, "fp32")
    for name, param in hf.named_parameters():  # BLIP-2 / MiniGPT-4: only the bridge trains
        param.requires_grad_(name.startswith(("qformer.", "query_tokens", "language_projection.")))
    mm.train()
    hf.qformer.train()
    conversations = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[1]}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "a small red circle and a square"}]}]
                     for _ in range(8)]
    batch = processor(conversations, images=images[:8], return_labels=True, padding_side="right")
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for name, m in (("mmbridge", mm), ("hf", hf))}

    def step(model, optimizer):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {"mmbridge": [], "hf": []}
    for name, model in (("mmbridge", mm), ("hf", hf)):
        step(model, optimizers[name])  # warm-up
    for _ in range(steps):
        for name, model in (("mmbridge", mm), ("hf", hf)):
            times[name].append(timed(lambda m=model, o=optimizers[name]: step(m, o)))
    rates = {name: 8 / median(t) for name, t in times.items()}
    return {"batch": 8, "steps": steps, "mmbridge_samples_s": round(rates["mmbridge"], 2),
            "hf_samples_s": round(rates["hf"], 2), "ratio": round(rates["mmbridge"] / rates["hf"], 3)}


def memory_child(impl: str, directory: str, option: str) -> None:
    """Run in a fresh process: load, answer once (8 tokens), print peak RSS as JSON."""
    # Imports are not the model's memory: the baseline is taken after them.
    import numpy as np
    import psutil
    import torch  # noqa: F401
    from transformers import Blip2ForConditionalGeneration  # noqa: F401

    from mmbridge.generation.decode_options import apply_decode_options  # noqa: F401
    from mmbridge.modeling import MMBridgeModel  # noqa: F401
    from mmbridge.processing import MMBridgeProcessor

    processor = MMBridgeProcessor.from_pretrained(Path(directory).parent / "mm")
    size = processor.image_processor.size["height"]
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    reset = _reset_peak_rss()  # the peak of importing is not the model's
    baseline = psutil.Process().memory_info().rss
    model = load_mm(Path(directory), option) if impl == "mmbridge" else load_hf(Path(directory), option)
    loaded = _peak_rss()
    generate_fn(model, inputs_for(processor, [image], 1), 8, processor.tokenizer.pad_token_id)()
    print(json.dumps({"baseline": baseline, "peak_load": loaded, "peak": _peak_rss(), "reset": reset}))


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_rows(hf_dir: Path, mm_dir: Path, keys) -> list[dict]:
    file_bytes = {"hf": sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")),
                  "mmbridge": sum(f.stat().st_size for f in mm_dir.glob("*.safetensors"))}
    rows = []
    for impl, option in keys:
        directory = mm_dir if impl == "mmbridge" else hf_dir
        code = "import sys; from mmbridge.commands.bench import memory_child; memory_child(*sys.argv[1:])"
        done = subprocess.run([sys.executable, "-c", code, impl, str(directory), option], capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            rows.append({"impl": impl, "option": option, "error": done.stderr.strip().splitlines()[-1:]})
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        size = file_bytes[impl]
        rows.append({"impl": impl, "option": option, "file_mb": round(size / 1e6, 1),
                     "peak_rss_mb": round(result["peak"] / 1e6, 1),
                     "import_baseline_mb": round(result["baseline"] / 1e6, 1),
                     "load_over_file": round((result["peak_load"] - result["baseline"]) / size, 2),
                     "peak_over_file": round((result["peak"] - result["baseline"]) / size, 2)})
    return rows


def trainer_scaling(steps: int) -> dict:
    """The full `mmbridge train` stage (data pipeline + accelerate + logging), 1 process vs 2 under torchrun."""
    import csv
    import tempfile

    import yaml

    from mmbridge.train.fixtures import make_base_model, write_llava

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_base_model(work / "base")
        write_llava(work / "llava", n=256)
        stage = {"stage": "bench", "model": str(work / "base"), "train": ["qformer", "projection"],
                 "data": {"batch_size": 8, "num_workers": 1, "datasets": [
                     {"name": "vqa", "type": "llava_json", "path": str(work / "llava" / "llava.json")}]},
                 "schedule": {"total_steps": steps, "warmup_steps": 1, "init_lr": 1e-4, "min_lr": 1e-5},
                 "run": {"save_every": 10_000, "progress_bar": False}}
        (work / "stage.yaml").write_text(yaml.safe_dump(stage))
        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        results = {}
        for procs in (1, 2):
            out = work / f"run{procs}"
            cmd = ([str(bin_dir / "mmbridge"), "train", str(work / "stage.yaml"), "--out", str(out)] if procs == 1 else
                   [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "mmbridge.train",
                    str(work / "stage.yaml"), "--out", str(out)])
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
            with (out / "metrics.csv").open() as f:
                rows = list(csv.DictReader(f))[3:]  # skip warm-up steps
            results[f"{procs}_process_samples_s"] = round(median(float(r["samples_per_s"]) for r in rows), 1)
    results["speedup_2_over_1"] = round(results["2_process_samples_s"] / results["1_process_samples_s"], 2)
    results["note"] = (f"tiny see-model, 8 samples per process per step, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
                       f"median over steps 4..{steps}")
    return results


# -- report -----------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    machine, model = result["machine"], result["model"]
    lines = [f"# mmbridge bench: LLM {result['llm_size']} ({model['llm_params_m']} M params), "
             f"{machine['threads']} threads",
             "",
             f"{machine['cpu']}; torch {machine['torch']}, transformers {machine['transformers']}. "
             f"Measured bandwidth: {machine['bandwidth']['matvec_gb_s']} GB/s (fp32 mat-vec, "
             f"{machine['bandwidth']['matrix_mib']} MiB), {machine['bandwidth']['copy_gb_s']} GB/s (copy). "
             f"Medians of {result['repeats']} repeats; {result['new_tokens']} new tokens per timed generation."
             + (f" Greedy agreement with mmbridge fp32 over {next(iter(result['quality'].values()))['tokens']} "
                "teacher-forced answer tokens." if result.get("quality") else ""),
             "",
             "| impl | option | TTFT ms | decode tok/s b1 | decode tok/s b8 | decode GB/s | % of bandwidth "
             "| b1 vs HF fp32 | b1 vs HF bf16 | b8 vs HF fp32 | TTFT vs HF fp32 | greedy agreement (seq. match) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(row, base, key):
        value = row.get(f"vs_hf_{base}", {}).get(key)
        return f"{value}x" if value else ""

    for row in result["decode"]:
        q = result.get("quality", {}).get(row["option"]) if row["impl"] == "mmbridge" else None
        agreement = (f"{q['agreement']:.3f} ({q['sequence_match']:.3f})" if q else
                     ("reference" if (row["impl"], row["option"]) == ("mmbridge", "fp32") else ""))
        cells = [row["impl"], row["option"], row["ttft_ms"], row["decode_tok_s_b1"], row["decode_tok_s_b8"],
                 row["decode_gb_s"], row["bandwidth_pct"], ratio(row, "fp32", "decode_b1"),
                 ratio(row, "bf16", "decode_b1"), ratio(row, "fp32", "decode_b8"), ratio(row, "fp32", "ttft"),
                 agreement]
        lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    if "chat" in result:
        lines += ["", "3rd chat turn (ms) | mmbridge, KV reuse | mmbridge, re-encode | HF, re-encode | reuse speed-up "
                      "| vs HF", "|---|---|---|---|---|---|"]
        for key, row in result["chat"].items():
            lines.append(f"| {key.replace('_', ' ')} | {row['mmbridge_reuse']} | {row['mmbridge_reencode']} | "
                         f"{row['hf_reencode']} | {row['reuse_speedup']}x | {row['vs_hf']}x |")
    if "train" in result:
        t = result["train"]
        lines += ["", f"Training step (bridge trainable, AdamW, batch {t['batch']}): "
                      f"mmbridge {t['mmbridge_samples_s']} samples/s, HF {t['hf_samples_s']} samples/s "
                      f"({t['ratio']}x)."]
    if "memory" in result:
        lines += ["", "| memory | option | weights file MB | peak RSS MB | (load peak − import) / file "
                      "| (peak − import) / file |", "|---|---|---|---|---|---|"]
        for row in result["memory"]:
            if "error" in row:
                lines.append(f"| {row['impl']} | {row['option']} | error: {row['error']} | | | |")
            else:
                lines.append(f"| {row['impl']} | {row['option']} | {row['file_mb']} | {row['peak_rss_mb']} | "
                             f"{row['load_over_file']} | {row['peak_over_file']} |")
    if "shipped" in result:
        shipped = result["shipped"]
        lines += ["", f"Trained model `{shipped['model']}` (LLM {shipped['llm_params_m']} M params, LoRA adapters "
                      "merged or not): batch-1 decode and greedy agreement with its fp32 on its sample images.", "",
                  "| option | decode tok/s b1 | vs fp32 | greedy agreement | sequence match | NLL delta |",
                  "|---|---|---|---|---|---|"]
        for row in shipped["rows"]:
            cells = [row["option"], row["decode_tok_s_b1"], row["vs_fp32"], row.get("agreement", "reference"),
                     row.get("sequence_match", ""), row.get("nll_delta", "")]
            lines.append("| " + " | ".join("–" if c is None else str(c) for c in cells) + " |")
    if "profile" in result:
        lines += ["", "Where a batch-1 `generate` spends its time (self CPU %, top operators):", ""]
        for variant, ops in result["profile"].items():
            lines.append(f"- {variant}: " + ", ".join(f"{o['op']} {o['self_cpu_pct']}%" for o in ops))
    if "trainer" in result:
        t = result["trainer"]
        lines += ["", f"`mmbridge train` stage: 1 process {t['1_process_samples_s']} samples/s, 2 processes "
                      f"{t['2_process_samples_s']} samples/s ({t['speedup_2_over_1']}x; {t['note']})."]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                extra = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
                features = "".join(f", {f}" for f in extra)
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores{features})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(args) -> int:
    import tempfile

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from mmbridge.cli import CLIError
    from mmbridge.processing import MMBridgeProcessor

    options = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise CLIError(f"unknown --options {unknown}; choose from {', '.join(OPTIONS)}")
    if "fp32" not in options:
        options.insert(0, "fp32")  # the reference of the ratios and of the quality check
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.repeats < 1 or args.new_tokens < 2:
        raise CLIError("--repeats must be >= 1 and --new-tokens >= 2")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    tiny = args.llm_size == "tiny"
    work = Path(args.work or Path(tempfile.gettempdir()) / f"mmbridge-bench-{args.llm_size}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def say(message):
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    say(f"building / reusing the random BLIP-2 ({args.llm_size}) in {work}")
    hf_dir, mm_dir = build_pair(work, args.llm_size)
    processor = MMBridgeProcessor.from_pretrained(mm_dir)
    size = processor.image_processor.size["height"]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(max(8, args.quality_images))]

    result = {"llm_size": args.llm_size, "repeats": args.repeats, "new_tokens": args.new_tokens}
    say("measuring memory bandwidth")
    result["machine"] = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "bandwidth": bandwidth(args.bandwidth_mib or (64 if tiny else 1024), args.repeats)}
    models = load_variants(mm_dir, hf_dir, options)
    reference = models[("mmbridge", "fp32")][0]
    result["model"] = {"llm_params_m": round(sum(p.numel() for p in reference.llm.parameters()) / 1e6, 1),
                       "total_params_m": round(sum(p.numel() for p in reference.parameters()) / 1e6, 1),
                       "llm": {k: v for k, v in reference.config.text_config.to_dict().items()
                               if k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")},
                       "num_query_tokens": reference.config.num_query_tokens, "image_size": size}
    say(f"decode: {len(models)} variants x {args.repeats} repeats")
    result["decode"] = decode_rows(models, processor, images, args, result["machine"]["bandwidth"]["matvec_gb_s"])
    if args.profile:
        say("profile: one batch-1 generate per variant")
        result["profile"] = profile_rows(models, processor, images, args.new_tokens)
    if "quality" not in skip and len(options) > 1:
        say("quality: greedy agreement with fp32")
        result["quality"] = quality(models, processor, images[:args.quality_images], args.quality_tokens)
    if "chat" not in skip:
        say("chat: 3rd-turn latency")
        result["chat"] = chat_turns(reference, models[("hf", "fp32")][0], processor, images, args)
    del models, reference
    if "train" not in skip:
        say("training step")
        steps = args.train_steps or {"tiny": 3, "100m": 6}.get(args.llm_size, 3)
        result["train"] = train_rates(mm_dir, hf_dir, processor, images, steps)
    if "shipped" not in skip and args.quality_model:
        try:
            from mmbridge.models import resolve_model_path

            resolve_model_path(args.quality_model)
        except FileNotFoundError as err:
            say(f"no trained model to check: {err}")
        else:
            say(f"trained model {args.quality_model}: every option's agreement and speed")
            result["shipped"] = trained_model_rows(args.quality_model, options, args.repeats, args.new_tokens)
    if "memory" not in skip:
        say("peak RSS, one fresh process per model")
        same_weights = {o for o in options if OPTIONS[o][1].get("kv_cache") or OPTIONS[o][1].get("compile")}
        result["memory"] = memory_rows(hf_dir, mm_dir, [("hf", "fp32"), *(("mmbridge", o) for o in options
                                                                          if o not in same_weights)])
    if args.trainer:
        say("trainer: 1 vs 2 processes")
        result["trainer"] = trainer_scaling(30)
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(result))
    print(markdown(result))
    say(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0
