"""Group-wise int8 (`int8-g32`) linear kernels against fp32 on a 1 B LLM's weight shapes, every weight read from
memory: 40 different weights (the LM head: 6) are used in turn, so none stays in cache. Milliseconds per call,
medians of 3 passes; the first call of each shape compiles (reported apart).

    python bench/int8_kernels.py [--threads 2]
"""

import argparse
import statistics
import time

import torch

from mmbridge.modeling.quantize import Int8WeightOnlyLinear

SHAPES = ((5632, 2048, 40), (2048, 5632, 40), (2048, 2048, 80), (32000, 2048, 6))  # (out, in, copies)
ROWS = (1, 2, 4, 8, 73)


def per_call_ms(fn, items, passes: int = 3) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - start) / len(items) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| weight | rows | fp32 ms | int8-g32 ms | first call s |")
    print("|---|---|---|---|---|")
    for out_features, in_features, copies in SHAPES:
        base = torch.nn.Linear(in_features, out_features, bias=False).weight.detach()
        layers = []
        for i in range(copies):
            layer = Int8WeightOnlyLinear(in_features, out_features, group_size=32)
            layer.set_float_weight(base + 1e-3 * i)
            layers.append(layer)
        floats = [base + 1e-3 * i for i in range(max(2, copies // 10))]
        with torch.no_grad():
            for rows in ROWS:
                x = torch.randn(rows, in_features)
                start = time.perf_counter()
                layers[0](x)  # compiles this (shape, rows) once
                first = time.perf_counter() - start
                fp32 = per_call_ms(lambda w, x=x: torch.nn.functional.linear(x, w), floats)
                int8 = per_call_ms(lambda layer, x=x: layer(x), layers)
                print(f"| {out_features} x {in_features} | {rows} | {fp32:.2f} | {int8:.2f} | {first:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
