from transformers import AutoConfig

from mmbridge.config import MMBridgeConfig
from mmbridge.modeling.model import MMBridgeModel

AutoConfig.register("mmbridge", MMBridgeConfig, exist_ok=True)

__all__ = ["MMBridgeConfig", "MMBridgeModel"]
