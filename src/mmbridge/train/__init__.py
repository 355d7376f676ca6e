"""Training engine: typed stage configs, data streams, accelerate trainer, atomic checkpoints.

`mmbridge train CONFIG.yaml --out RUN_DIR` runs one stage; see docs/training.md.
"""

from mmbridge.train.config import ConfigError, StageConfig, load_stage_config

__all__ = ["ConfigError", "StageConfig", "load_stage_config"]
