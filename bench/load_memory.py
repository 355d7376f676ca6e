"""Peak memory of loading an mmbridge model dir, relative to its file size (not part of the test suite).

Builds a ~500 MB (fp32) random model dir once, then loads it in a fresh subprocess per mode and reports
the subprocess's peak RSS (`ru_maxrss`) — absolute, and above the RSS it had after importing torch +
transformers — divided by the size of the weights file.

    python bench/load_memory.py [--dir /tmp/mmbridge-bench] [--modes lean,lean-bf16,naive]

Modes: `lean` = `mmbridge.interop.loading.load_model` (transformers `from_pretrained`: meta-device
init, memory-mapped safetensors, tensors assigned); `lean-bf16` = the same with dtype=bfloat16;
`naive` = build the model (random init) then `load_state_dict` from a loaded file — the double copy
the lean path avoids, for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, psutil
import torch
from mmbridge.modeling import MMBridgeModel, MMBridgeConfig
from mmbridge.interop.loading import load_model
baseline = psutil.Process().memory_info().rss
directory, mode = sys.argv[1], sys.argv[2]
if mode == "lean":
    model = load_model(directory)
elif mode == "lean-bf16":
    model = load_model(directory, dtype="bfloat16")
else:
    from safetensors.torch import load_file
    model = MMBridgeModel(MMBridgeConfig.from_pretrained(directory))
    model.load_state_dict(load_file(directory + "/model.safetensors"), strict=False)
params = sum(p.numel() * p.element_size() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
print(json.dumps({"baseline": baseline, "peak": peak, "param_bytes": params}))
"""


def build(directory: Path) -> Path:
    import torch

    from mmbridge.modeling import MMBridgeModel
    from mmbridge.testing import tiny_config

    if (directory / "model.safetensors").is_file():
        return directory / "model.safetensors"
    # A Llama-shaped LM (hidden 1024, 6 layers, 32k vocab) dominates: ~124 M params, ~500 MB in fp32.
    config = tiny_config(32000, 31999)
    config.text_config.update({"hidden_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 16,
                               "num_key_value_heads": 16, "intermediate_size": 2816})
    torch.manual_seed(0)
    MMBridgeModel(config).save_pretrained(directory)
    return directory / "model.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/mmbridge-bench-load")
    parser.add_argument("--modes", default="lean,lean-bf16,naive")
    args = parser.parse_args()
    weights = build(Path(args.dir))
    size = weights.stat().st_size
    print(f"weights file: {weights} ({size / 1e6:.0f} MB)")
    for mode in args.modes.split(","):
        result = json.loads(subprocess.run([sys.executable, "-c", CHILD, args.dir, mode], check=True,
                                           capture_output=True, text=True).stdout.strip().splitlines()[-1])
        peak, base = result["peak"], result["baseline"]
        print(f"{mode:10s} peak RSS {peak / 1e6:7.0f} MB  (import baseline {base / 1e6:.0f} MB, params "
              f"{result['param_bytes'] / 1e6:.0f} MB)  peak/file = {peak / size:.2f}  "
              f"(peak - baseline)/file = {(peak - base) / size:.2f}")


if __name__ == "__main__":
    main()
