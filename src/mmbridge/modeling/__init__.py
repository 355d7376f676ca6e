from transformers import AutoConfig, AutoModel, Blip2VisionConfig, Blip2VisionModel

from mmbridge.config import MMBridgeConfig
from mmbridge.modeling import act, draw  # noqa: F401  (register the act and draw head kinds)
from mmbridge.modeling.model import MMBridgeModel

AutoConfig.register("mmbridge", MMBridgeConfig, exist_ok=True)
# transformers ships BLIP-2's vision tower only inside Blip2* models (no AutoModel entry); register it
# so that a `vision_config` of type `blip_2_vision_model` (BLIP-2 / MiniGPT-4 imports) can be built.
AutoModel.register(Blip2VisionConfig, Blip2VisionModel, exist_ok=True)

__all__ = ["MMBridgeConfig", "MMBridgeModel"]
