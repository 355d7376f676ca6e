"""BLIP-2 stage 1 checks: ITC retrieval R@1 of a Q-Former on a frozen image encoder.

The stage-1 losses (ITC + ITM + ITG, LAVIS' `Blip2Qformer.forward`) live on the model
(`QFormer.stage1_losses`, reported by `MMBridgeModel.forward` as `itc` / `itm` / `itg`), and the stage
runs through `mmbridge.train.Trainer` like every other stage (recipes/shapes_stage1_qformer.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmbridge.evaluate import recall_at_1
from mmbridge.modeling.qformer import QFormer
from mmbridge.tokenization import tokenize_qformer_text


@torch.no_grad()
def retrieval_recall(qformer: QFormer, image_features: torch.Tensor, texts: Sequence[str], tokenizer, *,
                     cls_token_id: int, batch_size: int = 256) -> dict[str, float]:
    """ITC image->text and text->image R@1 over aligned (image i, text i) pairs.

    A retrieved item counts as correct when its text equals the true text: scenes that share a caption
    are indistinguishable by that caption, so either is a right answer."""
    qformer.eval()
    image_embeds = torch.cat([qformer.image_embeds(image_features[i:i + batch_size])
                              for i in range(0, len(image_features), batch_size)])
    text_embeds = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenize_qformer_text(tokenizer, texts[i:i + batch_size], cls_token_id)
        text_embeds.append(qformer.text_embeds(ids, mask))
    i2t, t2i, _ = recall_at_1(qformer.similarity(image_embeds, torch.cat(text_embeds)), texts)
    return {"image_to_text_r1": i2t.float().mean().item(), "text_to_image_r1": t2i.float().mean().item(),
            "n": len(texts)}

