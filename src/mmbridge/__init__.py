"""mmbridge: compose frozen pretrained models into one multimodal LLM and train only the bridges."""

__version__ = "0.1.0"

_LAZY = {
    "MMBridgeConfig": "mmbridge.config",
    "MMBridgeModel": "mmbridge.modeling",
    "MMBridgeProcessor": "mmbridge.processing",
    "MMBridgePipeline": "mmbridge.generation",
    "ChatSession": "mmbridge.generation",
    "SamplingOptions": "mmbridge.generation",
}


def __getattr__(name):
    # Lazy so that `import mmbridge` (and `mmbridge --help`) does not import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmbridge' has no attribute {name!r}")


__all__ = list(_LAZY)
