"""Weight interop: load real HF-format components, import BLIP-2 / MiniGPT-4 checkpoints, build models.

- `loading`: safe (safetensors, `weights_only=True`) and lean (streamed, meta-device) weight I/O.
- `convert`: writes an mmbridge model dir from renamed tensors, checking every shape.
- `blip2`, `minigpt4`: importers; `build`: assemble a model from local HF dirs with a fresh bridge.
Heavy imports live in the submodules so that `import mmbridge.interop` stays cheap.
"""
