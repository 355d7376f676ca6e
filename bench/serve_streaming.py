"""Streaming vs non-streaming throughput at the same concurrency (issue 17: streams join the dynamic batch).

    python bench/serve_streaming.py [--model shapes] [--clients 16] [--requests 64] [--max-tokens 32]

Each client sends requests back to back over real HTTP (the `openai` client for streams, reading
every SSE event); req/s, tokens/s, p50/p95 latency to the last byte and, for streams, p50 time to the
first content token. The default model is the tiny random one (answers always run to max_tokens); pass
`--model shapes` (or a model dir) for a real one.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import time

import openai

from mmbridge.generation import MMBridgePipeline
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.testing import png_data_url, running_server, tiny_model_dir


def run(url: str, model: str, clients: int, requests: int, max_tokens: int, stream: bool) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                             {"type": "text", "text": "What is in the image?"}]}]

    def one(_):
        start = time.perf_counter()
        first = None
        if stream:
            text, tokens = "", 0
            for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                        stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter() - start
                    text += chunk.choices[0].delta.content
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
        else:
            tokens = client.chat.completions.create(model=model, messages=messages,
                                                    max_tokens=max_tokens).usage.completion_tokens
        return time.perf_counter() - start, tokens, first

    one(0)  # warm-up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    firsts = [r[2] for r in results if r[2] is not None]
    return {"rps": requests / wall, "tok_s": sum(r[1] for r in results) / wall,
            "p50": statistics.median(latencies) * 1000,
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000,
            "ttft": statistics.median(firsts) * 1000 if firsts else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir or shipped name (default: tiny random model)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.model:
        from mmbridge.models import resolve_model_path

        pipeline = MMBridgePipeline.from_pretrained(resolve_model_path(args.model))
    else:
        pipeline = MMBridgePipeline.from_pretrained(tiny_model_dir(tempfile.mkdtemp()))
    settings = ServeSettings(model_name="m", max_batch_size=args.max_batch_size, batch_wait_ms=5, max_queue=256)
    rows = []
    with running_server(create_app(pipeline, settings)) as url:
        for stream in (False, True):
            rows.append((stream, run(url, "m", args.clients, args.requests, args.max_tokens, stream)))
    print(f"{args.model or 'tiny'}: {args.clients} clients, {args.requests} requests, max_tokens {args.max_tokens}, "
          f"max batch {args.max_batch_size}\n")
    print("| mode | req/s | tokens/s | p50 ms | p95 ms | p50 first token ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for stream, r in rows:
        print(f"| {'streaming' if stream else 'non-streaming'} | {r['rps']:.1f} | {r['tok_s']:.0f} | {r['p50']:.0f} | "
              f"{r['p95']:.0f} | {r['ttft']:.0f} |")
    print(f"\nstreaming / non-streaming throughput: {rows[1][1]['rps'] / rows[0][1]['rps']:.2f}")


if __name__ == "__main__":
    main()
