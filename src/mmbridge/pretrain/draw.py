"""The ShapesWorld draw recipe's pieces: a see-model gains MiniGPT-5's draw head, and its training data.

* `add_draw_head`: a trained see-model + a frozen generator (a StableDiffusionPipeline dir, e.g. the
  one `pretrain.diffusion` trains) -> the same model with vokens `[IMG0]…[IMG7]` and a fresh mapper.
* `write_draw_data`: the seed's two stages as LLaVA JSON, the format users bring their own data in —
  stage 1 caption -> image ("Draw a large red circle above a small blue square." answered by the image),
  stage 2 interleaved: stories whose steps alternate sentences and pictures (told by the model, and told by
  the user a sentence a turn), and dialogues that change a drawing ("Now make the circle blue."). An
  `<image>` in an answer is an image the model draws.
"""

from __future__ import annotations

from pathlib import Path

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
        prompt = rng.choice(DRAW_PROMPTS).format(_lower_first(generator_caption(scene, requests))) + "."
        image = save(render(scene), f"draw-{i}.png")
        stage1.append({"id": f"draw-{i}", "image": [image],
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
        stage2.append({"id": f"story-{i}", "image": images,
                       "conversations": [{"from": "human", "value": "Tell me a short story with pictures."},
                                         {"from": "gpt", "value": answer}]})
        # the same story told by the user, one sentence a turn, drawn turn by turn (what `eval story` asks)
        turns = [m for step in steps for m in ({"from": "human", "value": step["text"]},
                                                {"from": "gpt", "value": "<image>"})]
        stage2.append({"id": f"story-turns-{i}", "image": images, "conversations": turns})
        edit = edit_pair(split, num_scenes + i, seed)
        prompt = rng.choice(DRAW_PROMPTS).format(_lower_first(short_caption(edit["before"]))) + "."
        stage2.append({"id": f"edit-{i}", "image": [save(render(edit["before"]), f"edit-{i}-0.png"),
                                                    save(render(edit["after"]), f"edit-{i}-1.png")],
                       "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "<image>"},
                                         {"from": "human", "value": edit["instruction"]},
                                         {"from": "gpt", "value": "<image>"}]})
    write_llava(stage1, str(out / "draw_stage1.json"))
    write_llava(stage2, str(out / "draw_stage2.json"))
    if see_turns:
        write_llava(see, str(out / "see.json"))
    return {"stage1_records": len(stage1), "stage2_records": len(stage2), "see_chats": len(see)}
