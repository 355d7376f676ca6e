"""Serving throughput: requests/s and p50/p95 latency at 1, 4, 16 concurrent clients,
dynamic batching (max batch 16) vs none (max batch 1), on a tiny random model over real HTTP.

    python bench/serve_throughput.py [--requests 64] [--max-tokens 32]

Every request is the same size (same prompt length, fixed max_tokens, EOS ignored by choosing a
prompt the tiny model answers up to the limit) so the numbers compare like with like.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import tempfile
import time

import httpx

from mmbridge.generation import MMBridgePipeline
from mmbridge.serve.app import ServeSettings, create_app
from mmbridge.serve.testing import png_data_url, running_server, tiny_model_dir


def run(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    body = {"model": "tiny", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}}, {"type": "text", "text": "hi"}]}]}
    http = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=clients + 4))
    http.post(f"{url}/v1/chat/completions", json=body).raise_for_status()  # warm-up

    def one(_):
        start = time.perf_counter()
        response = http.post(f"{url}/v1/chat/completions", json=body)
        response.raise_for_status()
        return time.perf_counter() - start, response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    http.close()
    latencies = sorted(r[0] for r in results)
    return {"rps": requests / wall, "tok_s": sum(r[1] for r in results) / wall,
            "p50": statistics.median(latencies) * 1000,
            "p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    pipeline = MMBridgePipeline.from_pretrained(tiny_model_dir(tempfile.mkdtemp()))
    rows = []
    for label, batch in (("unbatched", 1), ("batched", 16)):
        settings = ServeSettings(model_name="tiny", max_batch_size=batch, batch_wait_ms=5, max_queue=256)
        with running_server(create_app(pipeline, settings)) as url:
            for clients in args.concurrency:
                rows.append((label, clients, run(url, clients, args.requests, args.max_tokens)))
    print(f"{args.requests} requests/cell, {args.max_tokens} new tokens each, 1 image + short text prompt\n")
    print("| mode | clients | req/s | tokens/s | p50 ms | p95 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, clients, r in rows:
        print(f"| {label} | {clients} | {r['rps']:.1f} | {r['tok_s']:.0f} | {r['p50']:.0f} | {r['p95']:.0f} |")


if __name__ == "__main__":
    main()
