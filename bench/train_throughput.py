"""Training throughput of a tiny see-model.

1. Step loop, batch 8: `MMBridgeModel` vs HF `Blip2ForConditionalGeneration` built from the same tiny
   config (same ViT, Q-Former, Llama sizes, 4 queries), both with the bridge trainable only, same
   inputs, same AdamW — samples/s and their ratio, measured in the same run, interleaved.
2. The full `mmbridge train` stage (data pipeline + accelerate + logging) in 1 process and in 2
   processes under torchrun (gloo), from the stage's metrics.csv.

    python bench/train_throughput.py [--steps 30] [--skip-launch] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def tiny_pair(seed: int = 0):
    """(mmbridge model, HF Blip2 model, one batch of 8) on the same tiny configuration."""
    import random

    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from mmbridge.testing import build_tiny
    from mmbridge.train.fixtures import scene

    model, processor = build_tiny(seed=seed)
    cfg = model.config
    vision = {k: getattr(cfg.vision_config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "intermediate_size", "image_size", "patch_size")}
    blip_cfg = Blip2Config(vision_config=vision, qformer_config=cfg.qformer_config.to_dict(),
                           text_config=cfg.text_config.to_dict(), num_query_tokens=cfg.num_query_tokens,
                           image_token_index=cfg.image_token_index)
    torch.manual_seed(seed)
    blip = Blip2ForConditionalGeneration(blip_cfg)
    for name, param in blip.named_parameters():  # BLIP-2 / MiniGPT-4: only the bridge trains
        param.requires_grad_(name.startswith(("qformer.", "query_tokens", "language_projection.")))
    blip.vision_model.eval()
    blip.language_model.eval()
    blip.qformer.train()

    rng = random.Random(seed)
    conversations = []
    for _ in range(8):
        image, caption = scene(rng)
        conversations.append([{"role": "user", "content": [{"type": "image", "image": image},
                                                           {"type": "text", "text": "Describe the image."}]},
                              {"role": "assistant", "content": [{"type": "text", "text": caption}]}])
    batch = dict(processor(conversations, return_labels=True, padding_side="right"))
    model.train()
    return model, blip, batch


def step_rate(model, batch, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def bench_models(steps: int) -> dict:
    model, blip, batch = tiny_pair()
    counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in
              (("mmbridge", model), ("blip2", blip))}
    step_rate(model, batch, 5)  # warm up both
    step_rate(blip, batch, 5)
    ours, theirs = [], []
    for _ in range(3):  # interleave so that load from other jobs hits both alike
        ours += step_rate(model, batch, steps // 3)
        theirs += step_rate(blip, batch, steps // 3)
    rate = lambda ts: 8 / statistics.median(ts)  # noqa: E731
    return {"batch": 8, "threads": torch.get_num_threads(), "trainable_params": counts,
            "mmbridge_samples_per_s": round(rate(ours), 1), "hf_blip2_samples_per_s": round(rate(theirs), 1),
            "ratio_mmbridge_over_blip2": round(rate(ours) / rate(theirs), 3)}


def bench_launch(steps: int, work: Path) -> dict:
    import yaml

    from mmbridge.train.fixtures import make_base_model, write_llava

    make_base_model(work / "base")
    write_llava(work / "llava", n=256)
    stage = {"stage": "bench", "model": str(work / "base"), "train": ["qformer", "projection"],
             "data": {"batch_size": 8, "num_workers": 1,
                      "datasets": [{"name": "vqa", "type": "llava_json", "path": str(work / "llava" / "llava.json")}]},
             "schedule": {"total_steps": steps, "warmup_steps": 1, "init_lr": 1e-4, "min_lr": 1e-5},
             "run": {"save_every": 10_000, "progress_bar": False}}
    (work / "stage.yaml").write_text(yaml.safe_dump(stage))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # OMP_NUM_THREADS set by main()
    results = {}
    for procs in (1, 2):
        out = work / f"run{procs}"
        if procs == 1:
            cmd = [str(bin_dir / "mmbridge"), "train", str(work / "stage.yaml"), "--out", str(out)]
        else:
            cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "mmbridge.train",
                   str(work / "stage.yaml"), "--out", str(out)]
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)
        with (out / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))[3:]  # skip warm-up steps
        results[f"{procs}_process"] = {
            "global_batch": 8 * procs,
            "samples_per_s": round(statistics.median(float(r["samples_per_s"]) for r in rows), 1)}
    speeds = {name: results[name]["samples_per_s"] for name in ("1_process", "2_process")}
    results["speedup_2_over_1"] = round(speeds["2_process"] / speeds["1_process"], 2)
    results["note"] = (f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
                       f"8 samples per process per step; median over steps 4..{steps}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-launch", action="store_true", help="only the in-process model comparison")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process, for every measurement (torchrun's default is 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the launched runs
    result = {"torch": torch.__version__, "device": "cpu", "step_loop": bench_models(args.steps)}
    print(json.dumps(result, indent=2), flush=True)
    if not args.skip_launch:
        with tempfile.TemporaryDirectory() as tmp:
            result["trainer"] = bench_launch(args.steps, Path(tmp))
        print(json.dumps(result["trainer"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
