"""Shared fixtures. Everything is built offline from tiny configs; nothing may reach a model hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads cost more than they give, and CI has 2 cores


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny model dir (random weights, init wide enough that answers depend on inputs)."""
    from mmbridge.testing import build_tiny

    model, processor = build_tiny(seed=0, init_std=0.5)
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from mmbridge.generation import MMBridgePipeline

    return MMBridgePipeline.from_pretrained(tiny_model_dir)


@pytest.fixture
def images():
    """Three different deterministic RGB images as numpy arrays."""
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (40, 48, 3), dtype=np.uint8) for _ in range(3)]


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps process-wide singletons; trainer tests each start from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def gradio_env(tmp_path_factory):
    """Gradio's documented env settings for UI tests: no analytics, uploads in a temp dir we can inspect."""
    upload_dir = tmp_path_factory.mktemp("gradio-uploads")
    saved = {k: os.environ.get(k) for k in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR")}
    os.environ.update(GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(upload_dir))
    yield upload_dir
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
