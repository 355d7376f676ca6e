"""The act head (VisionLLM v2): routing tokens + super-link queries -> task decoders.

Importing this package registers the `act` head kind.
"""

from mmbridge.modeling.act.head import ActHead

__all__ = ["ActHead"]
