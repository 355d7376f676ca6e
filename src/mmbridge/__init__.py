"""mmbridge: compose frozen pretrained models into one multimodal LLM and train only the bridges."""

__version__ = "0.1.0"
