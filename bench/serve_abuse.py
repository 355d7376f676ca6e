"""Issue 17's reproductions against a real `mmbridge serve` process: status, time to answer, the server's
RSS growth, and a concurrent normal request's latency against its unloaded value.

    python bench/serve_abuse.py [--model shapes] [--repeat 6]

Each reproduction is sent `--repeat` times at once (the issue sent six image bombs at once) while one
normal request (max_tokens 8) runs; the server's RSS is read from /proc before and after.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def zero_png_url(size: int) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size)).save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def raw_body(model: str, content: str) -> bytes:
    """A request body written by hand (`content` goes in verbatim, JSON escapes included, as curl sends it)."""
    head = json.dumps({"model": model, "max_tokens": 3})[:-1]
    return (head + ', "messages": [{"role": "user", "content": "' + content + '"}]}').encode()


def reproductions(model: str) -> list[tuple[str, dict]]:
    def body(**kw):
        return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], **kw}

    json_type = {"content-type": "application/json"}
    eight = [{"type": "image_url", "image_url": {"url": zero_png_url(4096)}} for _ in range(8)]
    return [
        ("4 MB message", {"json": body(messages=[{"role": "user", "content": "ab " * 1_400_000}])}),
        ("25 MB message", {"content": raw_body(model, "ab " * 8_500_000), "headers": json_type}),
        ('stop "x" * 30000', {"json": body(stop="x" * 30000)}),
        ("eight zero 4096² PNGs", {"json": body(messages=[{"role": "user", "content": eight}])}),
        ("lone surrogate", {"content": raw_body(model, "a\\ud800b"), "headers": json_type}),
        ("seed 2^64", {"json": body(seed=2**64, temperature=1.0)}),
        ("seed 2^64, stream", {"json": body(seed=2**64, temperature=1.0, stream=True)}),
        ("presence_penalty 1", {"json": body(presence_penalty=1.0)}),
        ("max_tokens true", {"json": body(max_tokens=True)}),
        ('stream "yes"', {"json": body(stream="yes")}),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mmbridge"), "serve", "--model", args.model,
                               "--port", str(port), "--served-model-name", "m", "--log-level", "warning"],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        normal = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "How many shapes?"}]}
        http = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64))

        def timed(kwargs):
            start = time.perf_counter()
            response = http.post(f"{url}/v1/chat/completions", **kwargs)
            return response, time.perf_counter() - start

        for _ in range(3):
            timed({"json": normal})
        unloaded = statistics.median(timed({"json": normal})[1] for _ in range(5))
        print(f"{args.model}: unloaded normal request {unloaded * 1000:.0f} ms; each reproduction x{args.repeat} "
              "at once, with one normal request alongside\n")
        print("| reproduction | status (param) | slowest answer ms | server RSS growth MB "
              "| normal request ms (x unloaded) |")
        print("|---|---|---:|---:|---:|")
        for name, kwargs in reproductions("m"):
            before = rss_mb(server.pid)
            with concurrent.futures.ThreadPoolExecutor(args.repeat + 1) as pool:
                bad = [pool.submit(timed, kwargs) for _ in range(args.repeat)]
                time.sleep(0.02)
                ok, ok_seconds = pool.submit(timed, {"json": normal}).result()
                outcomes = [f.result() for f in bad]
            time.sleep(1.0)  # what stays: freed memory is handed back within a second
            after = rss_mb(server.pid)
            response = outcomes[0][0]
            param = response.json()["error"]["param"] if response.headers.get("content-type", "").startswith(
                "application/json") else "in-band"
            statuses = sorted({r.status_code for r, _ in outcomes})
            slowest = max(t for _, t in outcomes)
            print(f"| {name} | {statuses} ({param}) | {slowest * 1000:.0f} | {after - before:+.0f} | "
                  f"{ok_seconds * 1000:.0f} ({ok_seconds / unloaded:.1f}x, {ok.status_code}) |")
        http.close()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
