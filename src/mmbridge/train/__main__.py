"""`python -m mmbridge.train CONFIG.yaml --out RUN_DIR …` — the same as `mmbridge train`, handy under
`torchrun --nproc_per_node N -m mmbridge.train …` and `accelerate launch -m mmbridge.train …`."""

import sys

from mmbridge.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
