"""Stage-0 pretraining utilities on tiny settings: they run, learn, and hand over HF models."""

import random

import numpy as np
import torch

from mmbridge.pretrain.text import LMConfig, build_causal_lm, greedy_answers, pretrain_causal_lm, train_tokenizer
from mmbridge.pretrain.vision import CLIPWithDenseHeads, VisionConfig, patch_labels, pretrain_vision

TEXTS = [f"###Human: <Img>a {c} {s}</Img> What color? ###Assistant: {c}###"
         for c in ("red", "blue", "green") for s in ("circle", "square")]


def test_tokenizer_round_trips_and_keeps_special_tokens():
    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=300)
    text = "###Human: <Img><ImageHere></Img> What color is the ünïcode? ###Assistant: red###"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.convert_tokens_to_ids("<ImageHere>") == 4
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"


def test_lm_pretraining_learns_a_tiny_corpus():
    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=300)
    cfg = LMConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, steps=200, batch_size=8,
                   lr=3e-3, warmup_steps=10, max_length=64)
    model = build_causal_lm(tokenizer, cfg)
    losses = pretrain_causal_lm(model, tokenizer, lambda rng, n: [rng.choice(TEXTS) for _ in range(n)], cfg,
                                log=lambda _: None)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    prompts = [t.split("###Assistant: ")[0] + "###Assistant: " for t in TEXTS]
    answers = greedy_answers(model, tokenizer, prompts, stop="###")
    assert answers == [t.split("###Assistant: ")[1].rstrip("#") for t in TEXTS]


def test_patch_labels_pick_the_most_covering_object():
    a = np.zeros((16, 16), bool)
    a[0:8, 0:8] = True      # fills patch 0
    b = np.zeros((16, 16), bool)
    b[0:3, 4:8] = True      # a sliver of patch 0 (less than a)
    b[8:16, 8:16] = True    # fills patch 3
    labels = patch_labels([a, b], [5, 7], image_size=16, patch_size=8)
    assert labels.tolist() == [5, 0, 0, 7]


def test_vision_pretraining_runs_and_exports_the_tower():
    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=300)
    cfg = VisionConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, text_hidden_size=32,
                       text_layers=1, projection_dim=16, steps=3, batch_size=4, dense_targets={"color": 4})
    model = CLIPWithDenseHeads(tokenizer, cfg)
    rng = random.Random(0)

    def batch(step, n):
        texts = [rng.choice(TEXTS) for _ in range(n)]
        tok = tokenizer(texts, return_tensors="pt", padding=True)
        return dict(pixel_values=torch.randn(n, 3, 16, 16), input_ids=tok["input_ids"],
                    attention_mask=tok["attention_mask"], dense_labels={"color": torch.randint(0, 4, (n, 4))})

    history = pretrain_vision(model, batch, cfg, log=lambda _: None)
    assert len(history) == 3 and all(np.isfinite(history))
    tower = model.vision_tower()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(tower(pixel_values=pixels).last_hidden_state,
                           model.clip.vision_model(pixel_values=pixels).last_hidden_state)


def test_encode_samples_trains_only_marked_segments():
    from mmbridge.pretrain.text import encode_samples

    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=300)
    batch = encode_samples(tokenizer, [[("###Human: What color? ###Assistant: ", False), ("red###", True)],
                                       "plain text"], max_length=64)
    row, labels = batch["input_ids"][0], batch["labels"][0]
    trained = tokenizer.decode([t for t in labels.tolist() if t != -100], skip_special_tokens=False)
    assert trained == "red###</s>"
    assert tokenizer.decode(row[batch["attention_mask"][0].bool()]) .startswith("###Human: What color?")
    plain = batch["labels"][1][batch["attention_mask"][1].bool()]
    assert (plain != -100).all()  # a plain string trains every token


def test_shapes_clip_captions_end_with_eos_so_the_text_tower_pools_them():
    """Regression: without EOS, CLIP pooled every caption at its first token and ITC sat at log(batch)."""
    import random as _random

    from mmbridge.pretrain.shapes import vision_batch

    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=300)
    batch = vision_batch(_random.Random(0), 3, tokenizer, patch_size=16)
    lengths = batch["attention_mask"].sum(dim=1)
    last = batch["input_ids"][torch.arange(3), lengths - 1]
    assert (last == tokenizer.eos_token_id).all()
    assert set(batch["dense_labels"]) == {"color", "shape", "size", "column", "row"}
    assert batch["dense_labels"]["color"].shape == (3, 16)


def test_patches_learn_where_their_object_is():
    """Each covered patch's `column`/`row` label is its object's centre on a 24 × 24 grid (1-based;
    0 = background): CLIP's captions never say where things are, so without it the ViT drops position.
    The bins nest in the description's 3 × 3 regions (8 bins a third), so a region is a union of bins."""
    import random as _random

    from mmbridge.data.shapes.annotations import region
    from mmbridge.data.shapes.world import make_scene
    from mmbridge.pretrain.shapes import POSITION_BINS, vision_batch

    assert POSITION_BINS % 3 == 0
    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=300)
    rng = _random.Random(4)
    batch = vision_batch(_random.Random(4), 6, tokenizer, patch_size=8)
    scenes = [make_scene("train", rng.randrange(1_000_000), 0) for _ in range(6)]
    for b, scene in enumerate(scenes):
        columns, rows = batch["dense_labels"]["column"][b], batch["dense_labels"]["row"][b]
        for o in scene.objects:
            cx, cy = o.centre
            patch = int(cy // 8) * 8 + int(cx // 8)  # the patch under the centre is covered by the object
            column, row = int(columns[patch]) - 1, int(rows[patch]) - 1
            assert (column, row) == (int(cx * POSITION_BINS / 64), int(cy * POSITION_BINS / 64))
            third = POSITION_BINS // 3
            vertical, horizontal = ("top", "", "bottom")[row // third], ("left", "", "right")[column // third]
            assert region(o) == (f"{vertical} {horizontal}".strip() or "centre")
        assert ((columns == 0) == (rows == 0)).all()


def test_clip_text_embeddings_differ_between_captions():
    """Regression: with EOS id 2, transformers' CLIP pools at input_ids.argmax() (OpenAI's layout) — the
    first word for our tokenizers — so every caption got the same embedding. We pool at the last token."""
    tokenizer = train_tokenizer(TEXTS * 10, vocab_size=300)
    assert tokenizer.eos_token_id == 2
    cfg = VisionConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, text_hidden_size=32,
                       text_layers=1, projection_dim=16)
    model = CLIPWithDenseHeads(tokenizer, cfg)
    tok = tokenizer([t + tokenizer.eos_token for t in TEXTS[:3]], return_tensors="pt", padding=True)
    _, text_embeds, _ = model.embed(torch.randn(3, 3, 16, 16), tok["input_ids"], tok["attention_mask"])
    assert text_embeds.std(dim=0).mean() > 1e-3
