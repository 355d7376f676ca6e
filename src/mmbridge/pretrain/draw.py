"""The ShapesWorld draw recipe's pieces: a see-model gains MiniGPT-5's draw head, and its training data.

* `add_draw_head`: a trained see-model + a frozen generator (a StableDiffusionPipeline dir, e.g. the
  one `pretrain.diffusion` trains) -> the same model with vokens `[IMG0]…[IMG7]` and a fresh mapper.
* `write_draw_data`: the seed's two stages as LLaVA JSON, the format users bring their own data in —
  stage 1 caption -> image ("Draw a large red circle above a small blue square." answered by the image),
  stage 2 interleaved: stories whose steps alternate sentences and pictures (told by the model, and told by
  the user a sentence a turn), and dialogues that change a drawing ("Now make the circle blue."). An
  `<image>` in an answer is an image the model draws; a record's `"captions"` say what each drawn image shows
  (the caption-alignment target: the generator's own caption, not the user's request).
* `fit_draw_mapper`: the mapper trained alone on the frozen LLM's cached states (the recipe's `draw_mapper`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

DRAW_PROMPTS = ("Draw {}", "Make a picture of {}", "Show me {}", "Can you draw {}", "Paint {}")


def add_draw_head(model_dir: str | Path, generator_dir: str | Path, out: str | Path, **draw_settings) -> Path:
    from mmbridge.heads_config import DrawConfig
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.processing import MMBridgeProcessor

    model = MMBridgeModel.from_pretrained(model_dir)
    processor = MMBridgeProcessor.from_pretrained(model_dir)
    config = DrawConfig(pipeline_path=str(Path(generator_dir).resolve()), **draw_settings)
    model.add_head(config, processor.tokenizer)
    processor.register_head(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:].rstrip(".")


def write_draw_data(out: str | Path, num_scenes: int, num_stories: int, see_turns: int = 4, split: str = "train",
                    seed: int = 0) -> dict:
    """`out/draw_stage1.json` (caption -> image), `out/draw_stage2.json` (stories, edit dialogues) and
    `out/see.json` (see chats of `see_turns` questions about stage 1's scenes, which stage 2 mixes in so
    that the LoRA it trains keeps answering about images), images under `out/images/`."""
    import random

    from mmbridge.data.formats.llava import to_llava, write_llava
    from mmbridge.data.shapes.annotations import short_caption
    from mmbridge.data.shapes.edits import edit_pair, make_story
    from mmbridge.data.shapes.world import make_scene, render, rng_for
    from mmbridge.pretrain.diffusion import generator_caption
    from mmbridge.pretrain.shapes import qa_turns

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)

    def save(image, name: str) -> str:
        image.save(out / "images" / name)
        return f"images/{name}"

    stage1, see = [], []
    requests, questions = rng_for(seed, stream=16), random.Random(seed + 17)
    for i in range(num_scenes):
        scene = make_scene(split, i, seed)  # as the generator was trained: requests (relations) and captions
        caption = generator_caption(scene, requests)
        prompt = rng.choice(DRAW_PROMPTS).format(_lower_first(caption)) + "."
        image = save(render(scene), f"draw-{i}.png")
        stage1.append({"id": f"draw-{i}", "image": [image], "captions": [caption],
                       "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<image>"}]})
        if see_turns:
            messages = [m for q, a in qa_turns(scene, questions, see_turns)
                        for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
            see.append(to_llava(f"see-{i}", image, messages))
    stage2 = []
    for i in range(num_stories):
        steps = make_story(split, i, seed)
        answer = " ".join(f"{step['text']} <image>" for step in steps)
        images = [save(render(s["scene"]), f"story-{i}-{t}.png") for t, s in enumerate(steps)]
        captions = [short_caption(s["scene"]) for s in steps]  # what each frame shows, as the generator reads it
        stage2.append({"id": f"story-{i}", "image": images, "captions": captions,
                       "conversations": [{"from": "human", "value": "Tell me a short story with pictures."},
                                         {"from": "gpt", "value": answer}]})
        # the same story told by the user, one sentence a turn, drawn turn by turn (what `eval story` asks)
        turns = [m for step in steps for m in ({"from": "human", "value": step["text"]},
                                                {"from": "gpt", "value": "<image>"})]
        stage2.append({"id": f"story-turns-{i}", "image": images, "captions": captions, "conversations": turns})
        edit = edit_pair(split, num_scenes + i, seed)
        prompt = rng.choice(DRAW_PROMPTS).format(_lower_first(short_caption(edit["before"]))) + "."
        stage2.append({"id": f"edit-{i}", "image": [save(render(edit["before"]), f"edit-{i}-0.png"),
                                                    save(render(edit["after"]), f"edit-{i}-1.png")],
                       "captions": [short_caption(edit["before"]), short_caption(edit["after"])],
                       "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<image>"},
                                         {"from": "human", "value": edit["instruction"]},
                                         {"from": "gpt", "value": "<image>"}]})
    write_llava(stage1, str(out / "draw_stage1.json"))
    write_llava(stage2, str(out / "draw_stage2.json"))
    write_llava(story_first_frames(stage2), str(out / "draw_story_first.json"))
    if see_turns:
        write_llava(see, str(out / "see.json"))
    return {"stage1_records": len(stage1), "stage2_records": len(stage2), "see_chats": len(see)}


def story_first_frames(stage2: list[dict]) -> list[dict]:
    """Each story (told by the assistant, `story-N`, or by the user a sentence a turn, `story-turns-N`) cut
    after its first picture, with that frame's caption: what the draw mapper must also reach besides "Draw …"
    requests. A mapper fit on the requests alone drew story openings ("At first there was a large green cross
    on a gray background.") right 13 % of the time, 86 % with these (runs p1m / p3m, docs/recipe.md)."""
    first = []
    for record in stage2:
        if not record["id"].startswith("story-"):
            continue
        opening = record["conversations"][1]["value"].split("<image>")[0] + "<image>"
        first.append({"id": record["id"] + "-first", "image": record["image"][:1], "captions": record["captions"][:1],
                      "conversations": [record["conversations"][0], {"from": "gpt", "value": opening}]})
    return first


# -- the mapper on cached LLM states ------------------------------------------------------------------
#: What `cache_draw_inputs` keeps per drawn image: the mapper's inputs and its caption target.
CACHED = ("vokens", "request_states", "request_mask", "request_ids", "target")


@torch.no_grad()
def cache_draw_inputs(model, processor, conversations, batch_size: int = 32, log=print) -> dict[str, torch.Tensor]:
    """Run the frozen LLM once over chats that draw (a sequence of conversations, read as it is indexed): per
    drawn image with a caption, the vokens' last hidden states, the request's words before `[IMG0]`
    (`head_context`) and the generator's embedding of the caption (the mapper's target). Images without a
    caption are left out (they have no target)."""
    name = processor.image_head
    if name is None:
        raise ValueError("this model has no drawing head to fit a mapper for")
    head = model.heads[name]
    trigger = next(iter(head.config.routes))
    cache = {key: [] for key in CACHED}
    for start in range(0, len(conversations), batch_size):
        chunk = [conversations[i] for i in range(start, min(start + batch_size, len(conversations)))]
        batch = processor(chunk, return_labels=True, padding_side="right", truncation=True)
        targets = batch.get("head_targets", {}).get(trigger, [])
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "qformer_input_ids",
                                        "qformer_attention_mask", "region_image_index", "region_masks") if k in batch}
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
        for _, route, rows, positions in model.head_occurrences(batch["input_ids"]):
            if route != trigger:
                continue
            keep = [i for i, t in enumerate(targets) if t.get("caption")]
            if not keep:
                continue
            rows, positions = rows[keep], positions[keep]
            context = model.head_context(batch["input_ids"], rows, positions, None, hidden=hidden,
                                         attention_mask=batch["attention_mask"])
            cache["vokens"].append(hidden[rows, positions])
            for key in ("request_states", "request_mask", "request_ids"):
                cache[key].append(context[key])
            cache["target"].append(head.generator.caption_embeds([targets[i]["caption"] for i in keep]).float())
        if (start // batch_size) % 100 == 0:
            log({"cached": start + len(chunk), "of": len(conversations)})
    if not cache["target"]:
        raise ValueError("no drawn image with a caption in the data: the mapper has nothing to fit")
    return {key: torch.cat(values) for key, values in cache.items()}


def fit_draw_mapper(model_dir: str | Path, data: list[str | Path], out: str | Path, steps: int = 1500,
                    batch_size: int = 64, lr: float = 5e-4, held_out: int = 500, seed: int = 0,
                    log=print) -> dict:
    """The draw mapper trained on cached LLM states, caption alignment alone: `out/model`.

    The draw stages train the mapper through the LLM, so each sample costs an LLM forward (and the UNet's for
    the LDM loss): a stage sees ~13k samples, too few for the mapper to learn the text tower's function (MSE
    0.09-0.13, 29-38 % faithful; docs/recipe.md, runs m1-m6). With the LLM frozen its states are a function of
    the data, so this runs it once over `data` (LLaVA JSON whose records draw, with `"captions"`), keeps what
    the mapper reads, and trains the mapper alone for `steps` x `batch_size` samples (run n3: 96k samples, held-out
    MSE 0.03; the model then draws 48 % where its generator draws 51 % from the caption text). The last
    `held_out` drawings of `data` are not trained on: their MSE, before and after, is the stage's check.
    Resumable: `out/work/mapper` holds the loop's last save."""
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.pretrain import LoopCheckpoint, resumable_loop
    from mmbridge.processing import MMBridgeProcessor
    from mmbridge.train.data import LlavaJsonDataset

    out = Path(out)
    model = MMBridgeModel.from_pretrained(model_dir).eval()
    processor = MMBridgeProcessor.from_pretrained(model_dir)
    conversations = torch.utils.data.ConcatDataset([LlavaJsonDataset(str(path)) for path in data])
    cache = cache_draw_inputs(model, processor, conversations, log=log)
    total = len(cache["target"])
    if total <= held_out:
        raise ValueError(f"{total} captioned drawings in the data, not more than the {held_out} held out")
    train = {k: v[:-held_out] for k, v in cache.items()} if held_out else cache
    val = {k: v[-held_out:] for k, v in cache.items()} if held_out else None
    mapper = model.heads[processor.image_head].mapper
    model.requires_grad_(False)
    mapper.requires_grad_(True)

    def mapped(part: dict, index) -> torch.Tensor:
        return mapper(part["vokens"][index], part["request_states"][index], part["request_mask"][index],
                      part["request_ids"][index]).float()

    @torch.no_grad()
    def val_mse() -> float | None:
        if val is None:
            return None
        mapper.eval()
        error = sum(F.mse_loss(mapped(val, slice(i, i + 256)), val["target"][i:i + 256], reduction="sum")
                    for i in range(0, held_out, 256))
        return round(float(error) / val["target"].numel(), 4)

    before = val_mse()

    def step_loss(step: int) -> dict[str, torch.Tensor]:
        index = torch.randint(0, len(train["target"]), (batch_size,),
                              generator=torch.Generator().manual_seed(seed * 1_000_003 + step))
        return {"draw_caption": F.mse_loss(mapped(train, index), train["target"][index])}

    history = resumable_loop(mapper, steps, lr, max(1, steps // 20), LoopCheckpoint(out / "work" / "mapper"),
                             max(1, steps // 5), step_loss, log)
    after = val_mse()
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return {"drawings": total, "held_out": held_out, "samples": steps * batch_size,
            "held_out_caption_mse": {"before": before, "after": after},
            "train_caption_mse_last": round(sum(history[-50:]) / max(1, len(history[-50:])), 4) if history else None}
