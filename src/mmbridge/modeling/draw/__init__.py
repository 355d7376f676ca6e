"""The draw head (MiniGPT-5): vokens -> feature mapper -> a frozen latent-diffusion generator.

Importing this package registers the `draw` head kind; diffusers itself is imported only when a
generator is built.
"""

from mmbridge.modeling.draw.head import DrawHead
from mmbridge.modeling.draw.mapper import FeatureMapper

__all__ = ["DrawHead", "FeatureMapper"]
