"""ShapesWorld samples for every stage of the see recipe, drawn on the fly from the world's seeds.

Scenes are generated from `(split, index)`, so a stage can draw as many fresh training scenes as it
needs and the test split is never touched. The LM's text mirrors the chat template exactly, with
the scene's detailed description standing where the image's soft prompt will later stand:
`###Human: <Img>{description}</Img> {question} ###Assistant: {answer}###Human: …` — the frozen LM
can only read from image tokens what it learned to read from this text (ROADMAP §2, feasibility probe).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from mmbridge.data.shapes.annotations import description, qa_pairs, short_caption
from mmbridge.data.shapes.world import COLORS, SHAPES, coverage_map, make_scene, render, rng_for
from mmbridge.pretrain.text import Sample
from mmbridge.pretrain.vision import patch_labels

#: Training scenes are indexed 0..TRAIN_SCENES-1 (the world's seeds keep splits disjoint).
TRAIN_SCENES = 1_000_000
END = "###"


def qa_turns(scene, rng: random.Random, num_qa: int) -> list[tuple[str, str]]:
    """Up to `num_qa` (question, answer) turns: canonical and varied wording, sometimes "Describe the image."."""
    seed = rng.randrange(1 << 30)
    pool = qa_pairs(scene, rng_for(seed, 3), varied=rng.random() < 0.3, include_describe=False)
    rng.shuffle(pool)
    turns = [(q["question"], q["answer"]) for q in pool[:num_qa]]
    if rng.random() < 0.3:
        turns.insert(rng.randrange(len(turns) + 1), ("Describe the image.", short_caption(scene)))
    return turns


def chat_text(context: str, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The MiniGPT-4 template as (text, trained) segments: answers train, prompts do not."""
    segments = []
    for i, (question, answer) in enumerate(turns):
        human = f"###Human: <Img>{context}</Img> {question} " if i == 0 else f"Human: {question} "
        segments += [(human + "###Assistant: ", False), (answer + END, True)]
    return segments


def lm_dialogue(rng: random.Random, num_qa: int = 8, split: str = "train") -> Sample:
    """A text-only chat about one scene. The description is trained too: its relation sentences repeat
    every object's name, which is the copy-by-content skill (induction) that answering needs."""
    scene = make_scene(split, rng.randrange(TRAIN_SCENES), 0)
    context = description(scene)
    segments = chat_text(context, qa_turns(scene, rng, num_qa))
    head, rest = segments[0]
    prefix = "###Human: <Img>"
    assert head.startswith(prefix + context)
    return [(prefix, False), (context, True), (head[len(prefix) + len(context):], False)] + segments[1:]


def lm_samples(rng: random.Random, n: int) -> list[Sample]:
    return [lm_dialogue(rng) for _ in range(n)]


def lm_corpus(num: int, seed: int = 0) -> list[str]:
    """Plain text for training the tokenizer (train split only)."""
    rng = random.Random(seed)
    return ["".join(text for text, _ in lm_dialogue(rng)) for _ in range(num)]


# -- vision ---------------------------------------------------------------------------------------
DENSE_TARGETS = {"color": len(COLORS) + 1, "shape": len(SHAPES) + 1, "size": 3}  # class 0 = background


def image_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) in [-1, 1] (the processors of shapes models use mean = std = 0.5)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def vision_batch(rng: random.Random, n: int, tokenizer, patch_size: int, split: str = "train") -> dict:
    """Images, their short captions (CLIP text) and per-patch color/shape/size labels."""
    scenes = [make_scene(split, rng.randrange(TRAIN_SCENES), 0) for _ in range(n)]
    pixels = torch.stack([image_tensor(render(s)) for s in scenes])
    # CLIP's text tower pools the hidden state at the first EOS: without one every caption pools its
    # first token, all texts look alike and the contrastive loss sits at log(batch) forever.
    texts = tokenizer([short_caption(s) + tokenizer.eos_token for s in scenes], return_tensors="pt", padding=True)
    dense = {name: [] for name in DENSE_TARGETS}
    for s in scenes:
        masks = [coverage_map(o) > 0.5 for o in s.objects]
        size = pixels.shape[-1]
        dense["color"].append(patch_labels(masks, [list(COLORS).index(o.color) + 1 for o in s.objects], size, patch_size))
        dense["shape"].append(patch_labels(masks, [SHAPES.index(o.shape) + 1 for o in s.objects], size, patch_size))
        dense["size"].append(patch_labels(masks, [1 + (o.size == "large") for o in s.objects], size, patch_size))
    return {"pixel_values": pixels, "input_ids": texts["input_ids"], "attention_mask": texts["attention_mask"],
            "dense_labels": {k: torch.stack(v) for k, v in dense.items()}}


# -- composing and checking ------------------------------------------------------------------------
def shapes_processor(tokenizer, num_query_tokens: int, image_size: int = 64, instruction: bool = False):
    """MiniGPT-4 template and stop string; images scaled to [-1, 1] exactly as `image_tensor` does.
    `instruction`: the Q-Former is instruction-aware (its text starts with the tokenizer's BOS as CLS)."""
    from transformers import BlipImageProcessorPil

    from mmbridge.processing import PRESET_STOP_STRINGS, MMBridgeProcessor, chat_template_preset

    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return MMBridgeProcessor(image_processor, tokenizer, chat_template=chat_template_preset("minigpt4"),
                             num_query_tokens=num_query_tokens, stop_strings=PRESET_STOP_STRINGS["minigpt4"],
                             qformer_cls_token_id=tokenizer.bos_token_id if instruction else None, qformer_max_length=64)


@torch.no_grad()
def text_qa_accuracy(lm, tokenizer, num_scenes: int = 100, split: str = "val") -> dict[str, float]:
    """The frozen LM's ceiling: canonical questions answered from the description given as text."""
    from mmbridge.data.shapes.dataset import eval_questions
    from mmbridge.data.shapes.metrics import vqa_match
    from mmbridge.pretrain.text import greedy_answers

    prompts, answers, types = [], [], []
    for i in range(num_scenes):
        scene = make_scene(split, i, 0)
        for q in eval_questions(scene):
            if q["type"] == "describe":
                continue
            prompts.append("".join(t for t, _ in chat_text(description(scene), [(q["question"], "")]))[:-len(END)])
            answers.append(q["answer"])
            types.append(q["type"])
    predictions = greedy_answers(lm, tokenizer, prompts, END)
    return accuracy_by_type([vqa_match(p, a) for p, a in zip(predictions, answers)], types)


def accuracy_by_type(correct: list[bool], types: list[str]) -> dict[str, float]:
    out = {"all": round(sum(correct) / max(len(correct), 1), 4), "n": len(correct)}
    for t in sorted(set(types)):
        hits = [c for c, ty in zip(correct, types) if ty == t]
        out[t] = round(sum(hits) / len(hits), 4)
    return out


@torch.no_grad()
def scene_features(model, split: str, num: int, start: int = 0, batch_size: int = 128) -> tuple[torch.Tensor, list[str]]:
    """Frozen-ViT features and short captions of scenes `start .. start+num` of a split."""
    feats, texts = [], []
    for i in range(start, start + num, batch_size):
        scenes = [make_scene(split, j, 0) for j in range(i, min(i + batch_size, start + num))]
        feats.append(model.vision(torch.stack([image_tensor(render(s)) for s in scenes])))
        texts += [short_caption(s) for s in scenes]
    return torch.cat(feats), texts


def write_stage_data(out, num_scenes: int, qa_per_scene: int, single_qa_per_scene: int = 0, seed: int = 0) -> dict:
    """Training files for stages 2 and 3, in the formats users bring their own data in:
    webdataset shards of (image, short caption) and (image, detailed description) for alignment,
    and LLaVA JSON chats for the template stage: per scene one chat of `qa_per_scene` turns
    (sometimes with a description request) and `single_qa_per_scene` one-question chats."""
    from pathlib import Path

    from mmbridge.data.formats.llava import write_llava
    from mmbridge.data.formats.webdataset import ShardWriter
    from mmbridge.data.shapes.world import png_bytes

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed + 3)
    records = []
    with ShardWriter(str(out / "captions" / "shard-%04d.tar"), 2000) as captions, \
            ShardWriter(str(out / "descriptions" / "shard-%04d.tar"), 2000) as descriptions:
        for i in range(num_scenes):
            scene = make_scene("train", i, 0)
            key = f"train-{i:06d}"
            png = png_bytes(render(scene))
            (out / "images" / f"{key}.png").write_bytes(png)
            captions.write({"__key__": key, "png": png, "txt": short_caption(scene), "json": {}})
            descriptions.write({"__key__": key, "png": png, "txt": description(scene), "json": {}})
            messages = []
            for question, answer in qa_turns(scene, rng, qa_per_scene):
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            records.append(to_llava_record(key, messages))
            singles = qa_turns(scene, rng, single_qa_per_scene)[:single_qa_per_scene] if single_qa_per_scene else []
            for question, answer in singles:
                records.append(to_llava_record(key, [{"role": "user", "content": question},
                                                     {"role": "assistant", "content": answer}]))
    write_llava(records, str(out / "instruct.json"))
    return {"scenes": num_scenes, "chats": len(records), "turns": sum(len(r["conversations"]) // 2 for r in records)}


def to_llava_record(key: str, messages: list[dict]) -> dict:
    from mmbridge.data.formats.llava import to_llava

    return to_llava(key, f"images/{key}.png", messages)


def frozen_parts_identical(before, after) -> bool:
    """Every parameter and buffer of the frozen components (vision, LLM) is bit-identical. LoRA adapters
    are not the LLM's own weights: they wrap its layers (`q_proj.weight` -> `q_proj.base_layer.weight`)."""
    from mmbridge.modeling.model import is_llm_adapter

    a = before.state_dict()
    b = {k.replace(".base_layer.", "."): v for k, v in after.state_dict().items() if not is_llm_adapter(k)}
    keys = [k for k in a if k.startswith(("vision.", "llm."))]
    return bool(keys) and all(k in b and torch.equal(a[k], b[k]) for k in keys)
