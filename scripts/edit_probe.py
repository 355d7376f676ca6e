"""Does an act model's editor use its two conditions? Seconds, not a run: the ε-MSE of the `[EDIT]` route's UNet on
`--n` test edit pairs at a few timesteps, with the source and the instruction, with the source zeroed, and with
the instruction (the mapped link states) zeroed. A condition the editor uses raises the loss when zeroed (run h2:
the source at t >= 500, the instruction nowhere; docs/recipe.md, "Edit").

    python scripts/edit_probe.py --model runs/h2x/model

Not a library module.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from mmbridge.data.shapes.edit_eval import edit_messages
from mmbridge.data.shapes.edits import edit_pair
from mmbridge.modeling import MMBridgeModel
from mmbridge.modeling.act.head import image_tensor
from mmbridge.models import resolve_model_path
from mmbridge.processing import MMBridgeProcessor


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--timesteps", default="50,250,500,750,950")
    args = parser.parse_args()
    torch.manual_seed(0)
    path = resolve_model_path(args.model)
    model, processor = MMBridgeModel.from_pretrained(path).eval(), MMBridgeProcessor.from_pretrained(path)
    edits = [edit_pair("test", i) for i in range(args.n)]
    out = model(**processor([edit_messages(e) for e in edits], return_labels=True))
    link = out.head_outputs["[EDIT]"]["hidden_states"]
    editor, generator = model.act.editor, model.act._draw_head().generator
    size, vae, scheduler = generator.image_size, generator.vae, generator.train_scheduler
    source = editor.source_latents(vae, torch.stack([image_tensor(e["before"].render(), size) for e in edits]))
    target = torch.stack([image_tensor(e["after"].render(), size) for e in edits])
    latents = vae.encode(target).latent_dist.mode() * vae.config.scaling_factor
    condition = editor.mapper(link)
    rows = {}
    for t in (int(v) for v in args.timesteps.split(",")):
        steps = torch.full((len(edits),), t)
        noise = torch.randn_like(latents)
        noisy = scheduler.add_noise(latents, noise, steps)
        rows[t] = {name: round(F.mse_loss(editor.unet(torch.cat([noisy, s], 1), steps,
                                                      encoder_hidden_states=c).sample, noise).item(), 4)
                   for name, s, c in (("both", source, condition), ("no_source", torch.zeros_like(source), condition),
                                      ("no_instruction", source, torch.zeros_like(condition)))}
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
