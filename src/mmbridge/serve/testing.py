"""Helpers for tests and benchmarks: a real uvicorn server on 127.0.0.1 in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", log_level: str = "warning") -> Iterator[str]:
    """Serve `app` on a free port; yields the base URL; shuts the server down on exit.

    The socket is bound here (port 0) and handed to uvicorn, so there is no race for the port.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def tiny_model_dir(directory, seed: int = 3):
    """Save a tiny random model (deterministic gibberish answers) where `from_pretrained` can load it.
    Seed 3 tends to generate up to the token limit rather than stopping early, which makes length-
    and cancellation-related behaviour observable."""
    from mmbridge.testing import build_tiny

    model, processor = build_tiny(seed=seed, init_std=0.5)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


_shared: dict[str, str] = {}


def shared_tiny_model_dir() -> str:
    """One tiny model directory per process, shared by all test modules (removed at exit)."""
    if "dir" not in _shared:
        import atexit
        import shutil
        import tempfile

        directory = tempfile.mkdtemp(prefix="mmbridge-serve-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        _shared["dir"] = str(tiny_model_dir(directory))
    return _shared["dir"]


def png_data_url(color=(200, 30, 30), size=(64, 64), fmt: str = "PNG") -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}[fmt]
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


#: What the tiny draw model learned to answer with a drawing.
DRAW_PROMPT = "Draw a red square."


def tiny_draw_model_dir(directory, steps: int = 30):
    """A tiny model with a draw head (tiny random SD-layout generator under `directory/sd`) whose mapper
    and `[IMG0]` row are trained a few steps so it answers `DRAW_PROMPT` with a drawing (as in
    tests/test_draw_head.py); saved under `directory/model`, which is returned. Needs diffusers."""
    from pathlib import Path

    import torch
    from PIL import Image

    from mmbridge.heads_config import DrawConfig
    from mmbridge.testing import build_tiny, build_tiny_sd

    directory = Path(directory)
    (directory / "sd").mkdir(parents=True, exist_ok=True)
    build_tiny_sd(directory / "sd")
    model, processor = build_tiny(seed=0)
    config = DrawConfig(pipeline_path=str(directory / "sd"), mapper_hidden_size=32, mapper_layers=(1, 1),
                        mapper_heads=2, num_inference_steps=3, condition_dropout=0.0)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    user = {"role": "user", "content": DRAW_PROMPT}
    answer = {"role": "assistant", "content": [{"type": "head", "head": "draw", "target": {
        "image": Image.new("RGB", (16, 16), (220, 40, 40)), "caption": "a red square"}}]}
    batch = processor([[user, answer]], return_labels=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        out = model(**batch, loss_names=["lm", "draw_caption", "draw_ldm"])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(directory / "model")
    processor.save_pretrained(directory / "model")
    return directory / "model"
