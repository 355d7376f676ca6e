"""The draw head: `[IMG0]` (trigger) + `[IMG1]…[IMG7]` (forced slots) -> mapper -> frozen diffusion.

Losses (MiniGPT-5): `draw_ldm`, the denoising loss of the target image under the mapped condition
through the frozen UNet (Min-SNR-γ); `draw_caption`, MSE between the mapped condition and the frozen
text encoder's embedding of the image's caption (stage 1 only: weight it 0 in stage 2). 10 % of the
mapped conditions are replaced by the unconditional one (zeros) in training, for classifier-free
guidance at inference.

Targets, one per `[IMG0]` in reading order: `{"image": PIL image | array | (3, H, W) tensor in [0, 1],
"caption": optional str}`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mmbridge.heads_config import DrawConfig
from mmbridge.modeling.draw.diffusion import DiffusionGenerator
from mmbridge.modeling.draw.mapper import FeatureMapper
from mmbridge.modeling.heads import REQUEST_WINDOW, OutputHead, register_head


def image_tensor(image, size: int) -> torch.Tensor:
    """A target image -> (3, size, size) in [-1, 1] (the VAE's range)."""
    if torch.is_tensor(image):
        tensor = image.float()
    else:
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return tensor * 2 - 1


@register_head
class DrawHead(OutputHead):
    kind = "draw"
    config: DrawConfig

    def __init__(self, config: DrawConfig, model_config):
        super().__init__(config, model_config)
        path = (model_config.component_paths or {}).get(f"{config.name}.generator") or config.pipeline_path
        if not path:
            raise ValueError(f"draw head {config.name!r}: give its frozen generator, a diffusers "
                             "StableDiffusionPipeline directory (DrawConfig.pipeline_path)")
        self.generator = DiffusionGenerator.from_pretrained(path)
        self.generator.requires_grad_(False)
        encoder_layers, decoder_layers = config.mapper_layers
        self.mapper = FeatureMapper(self.llm_hidden_size, config.mapper_hidden_size, self.generator.condition_dim,
                                    config.num_condition_queries or self.generator.condition_length,
                                    encoder_layers, decoder_layers, config.mapper_heads,
                                    **self._request_reader(config, model_config))

    @staticmethod
    def _request_reader(config: DrawConfig, model_config) -> dict:
        if not config.mapper_reads_request:
            return {}
        return {"request_window": REQUEST_WINDOW, "vocab_size": model_config.text_config.vocab_size}

    def map(self, hidden: torch.Tensor, context: dict | None) -> torch.Tensor:
        """The vokens' states (and the request's words before them, for a mapper that reads them) -> the
        generator's condition."""
        context = context or {}
        return self.mapper(hidden, context.get("request_states"), context.get("request_mask"),
                           context.get("request_ids"))

    def loss(self, hidden: torch.Tensor, targets: list[dict], route: str = "[IMG0]",
             context: dict | None = None) -> dict[str, torch.Tensor]:
        if len(targets) != hidden.shape[0]:
            raise ValueError(f"draw: {hidden.shape[0]} [IMG0] in the batch but {len(targets)} targets")
        size = self.generator.image_size
        images = torch.stack([image_tensor(t["image"], size) for t in targets]).to(hidden.device)
        mapped = self.map(hidden, context)
        condition = mapped
        if self.training and self.config.condition_dropout:
            keep = torch.rand(mapped.shape[0], 1, 1, device=mapped.device) >= self.config.condition_dropout
            condition = mapped * keep
        losses = {"draw_ldm": self.generator.ldm_loss(images, condition, self.config.snr_gamma)}
        captioned = [i for i, t in enumerate(targets) if t.get("caption")]
        if captioned and mapped.shape[1] == self.generator.condition_length:
            embeds = self.generator.caption_embeds([targets[i]["caption"] for i in captioned])
            losses["draw_caption"] = F.mse_loss(mapped[captioned].float(), embeds.float())
        return losses

    @torch.no_grad()
    def decode(self, hidden: torch.Tensor, route: str = "[IMG0]",
               context: dict | None = None) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.config.sample_seed)
        images = self.generator.sample(self.map(hidden, context), self.config.guidance_scale,
                                       self.config.num_inference_steps, generator)
        return {"image": images}
