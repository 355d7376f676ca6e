"""Decode throughput and chat-turn latency on a tiny config (CPU).

Usage: python bench/generation_speed.py [--hidden 256 --layers 4 --new-tokens 64]
Prints batch-1 and batch-8 decode tokens/s, and the 3rd-turn latency of a chat session with KV reuse
vs. re-encoding the whole conversation — measured in the same run.
"""

import argparse
import statistics
import time

import numpy as np
import torch

from mmbridge.generation import MMBridgePipeline
from mmbridge.testing import build_tiny


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build_tiny(seed=0, init_std=0.5, num_query_tokens=32)
    # widen the tiny LM so timings mean something, keeping everything else tiny
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.testing import tiny_config
    config = tiny_config(len(processor.tokenizer), processor.image_token_id, num_query_tokens=32, init_std=0.5)
    config.text_config.update(dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8))
    torch.manual_seed(0)
    model = MMBridgeModel(config).eval()
    pipe = MMBridgePipeline(model, processor)
    processor.stop_strings = []  # fixed-length decoding for a fair tokens/s
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(8)]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    kw = dict(max_new_tokens=args.new_tokens)
    eos = processor.tokenizer.eos_token_id
    model.llm.model.generation_config.eos_token_id = None

    def run(batch):
        results = pipe.generate([conv] * batch, images=images[:batch], **kw)
        return sum(r.completion_tokens for r in results)

    pipe.generate(conv, images=images[:1], max_new_tokens=4)  # warm-up
    t1, n1 = timed(lambda: run(1), args.repeats)
    t8, n8 = timed(lambda: run(8), args.repeats)

    def third_turn(reuse, new_tokens):
        session = pipe.chat(max_new_tokens=32, reuse_cache=reuse)
        session.ask("What is this?", images=[images[0]])
        session.ask("Describe it in detail.", images=[images[1]])
        start = time.perf_counter()
        session.ask("And the colors?", max_new_tokens=new_tokens)
        return time.perf_counter() - start

    turn = {(reuse, n): statistics.median(third_turn(reuse, n) for _ in range(args.repeats))
            for reuse in (True, False) for n in (1, 32)}
    llm_params = sum(p.numel() for p in model.llm.parameters()) / 1e6
    print(f"LLM {llm_params:.2f} M params (hidden {args.hidden}, {args.layers} layers), "
          f"{args.new_tokens} new tokens, torch threads {args.threads}, eos {eos} disabled")
    print(f"batch 1 decode: {n1 / t1:8.1f} tok/s")
    print(f"batch 8 decode: {n8 / t8:8.1f} tok/s  ({n8 / t8 / (n1 / t1):.2f}x batch 1)")
    for n, label in ((1, "time to first token"), (32, "32-token answer")):
        reuse, scratch = turn[(True, n)], turn[(False, n)]
        print(f"3rd chat turn, {label:19s}: KV reuse {reuse * 1000:7.1f} ms   re-encode {scratch * 1000:7.1f} ms"
              f"   ({scratch / reuse:.2f}x)")


if __name__ == "__main__":
    main()
