import io

import pytest
import torch
from PIL import Image

from mmbridge.processing import IGNORE_INDEX, ImageLoadError, load_image
from mmbridge.testing import build_tiny


def conversation(*turns, image_first=True):
    """user/assistant text pairs; the first user turn starts with an image part."""
    messages = []
    for i, (user, answer) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 and image_first else []) + [{"type": "text", "text": user}]
        messages.append({"role": "user", "content": content})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def test_minigpt4_template_renders_the_seed_format():
    _, processor = build_tiny()
    text = processor.render(conversation(("What color is the circle?", "red"), ("How many?", None)),
                            add_generation_prompt=True)
    assert text == ("###Human: <Img><ImageHere></Img> What color is the circle? ###Assistant: red"
                    "###Human: How many? ###Assistant: ")


def test_labels_cover_only_answers_and_end_symbol(images):
    _, processor = build_tiny()
    batch = processor(conversation(("What color?", "red"), ("How many?", "3")), images=images[:1],
                      return_labels=True, padding_side="right")
    labels = batch["labels"][0]
    target = processor.tokenizer.decode([t for t in labels.tolist() if t != IGNORE_INDEX])
    assert target == "red###3###"  # the space after "###Assistant:" belongs to the prompt
    image_positions = batch["input_ids"][0] == processor.image_token_id
    assert int(image_positions.sum()) == processor.num_query_tokens
    assert (labels[image_positions] == IGNORE_INDEX).all()


def test_loss_ignores_prompt_and_image_positions(images):
    model, processor = build_tiny(init_std=0.5)
    batch = processor(conversation(("What color?", "red")), images=images[:1], return_labels=True)
    with torch.no_grad():
        loss = model(**batch).loss
        logits = model(**batch).logits[0, :-1]
    targets = batch["labels"][0, 1:]
    keep = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert 0 < int(keep.sum()) < 6


def test_several_images_each_get_their_own_soft_prompt(images):
    model, processor = build_tiny(init_std=0.5)
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                         {"type": "text", "text": "Which is brighter?"}]}]
    batch = processor(conv, images=images[:2])
    assert batch["pixel_values"].shape[0] == 2
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])
    features = model.get_image_features(batch["pixel_values"])
    slots = (batch["input_ids"][0] == processor.image_token_id).nonzero().squeeze(-1)
    q = processor.num_query_tokens
    assert torch.equal(embeds[0, slots[:q]], features[0])
    assert torch.equal(embeds[0, slots[q:]], features[1])
    swapped = processor(conv, images=[images[1], images[0]])
    assert not torch.equal(model(**batch).logits, model(**swapped).logits)


def test_images_embedded_in_parts_or_passed_separately_agree(images):
    _, processor = build_tiny()
    inline = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Hi"}]}]
    a = processor(inline)
    b = processor(conversation(("Hi", None)), images=images[:1])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_wrong_image_count_is_a_clear_error(images):
    _, processor = build_tiny()
    with pytest.raises(ValueError, match="1 image part.*2 image"):
        processor(conversation(("Hi", None)), images=images[:2])
    with pytest.raises(ValueError, match="0 image"):
        processor(conversation(("Hi", None)))


def test_model_checks_placeholders_against_images(images):
    model, processor = build_tiny()
    batch = processor(conversation(("Hi", None)), images=images[:1])
    with pytest.raises(ValueError, match=r"4 image-token positions but 2 image"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2))


def test_unknown_part_type_and_role_are_rejected():
    _, processor = build_tiny()
    with pytest.raises(ValueError, match="unknown part type 'video'"):
        processor([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        processor([{"role": "robot", "content": "hi"}])


def test_unreadable_missing_and_huge_images_give_clear_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageLoadError, match="cannot read image"):
        load_image(bad)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ImageLoadError):
        load_image(truncated)
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(buffer.getvalue(), max_pixels=32 * 32)


def test_truncation_never_cuts_through_an_image(images):
    _, processor = build_tiny()
    processor.max_length = 6  # "###Human:" + part of the image block
    batch = processor(conversation(("Hello there", "yes")), images=images[:1], truncation=True)
    ids = batch["input_ids"][0].tolist()
    assert len(ids) <= 6
    assert ids.count(processor.image_token_id) in (0, processor.num_query_tokens)
    assert batch["pixel_values"].shape[0] == ids.count(processor.image_token_id) // processor.num_query_tokens


@pytest.mark.parametrize("preset, expected_prompt, expected_target", [
    ("llama2", "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<Img><ImageHere></Img> What color? [/INST] red </s>"
               "<s>[INST] How many? [/INST]", " red </s>"),
    ("plain", "Be brief.\nUSER: <Img><ImageHere></Img> What color?\nASSISTANT: red</s>\nUSER: How many?\nASSISTANT: ",
     " red</s>"),
])
def test_other_template_presets_render_and_mask(preset, expected_prompt, expected_target, images):
    _, processor = build_tiny(template=preset)
    messages = [{"role": "system", "content": "Be brief."}] + conversation(("What color?", "red"), ("How many?", None))
    rendered = processor.render(messages, add_generation_prompt=True)
    assert rendered == expected_prompt
    batch = processor(messages[:3], images=images[:1], return_labels=True)
    target = processor.tokenizer.decode([t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX],
                                        skip_special_tokens=False)
    assert target.strip() == expected_target.strip()


def test_processor_renders_safely_from_many_threads(images):
    """transformers' cached chat template keeps per-render state; the processor serialises renders, so
    a server's request threads and batch worker can encode at once (this raised at random before)."""
    from concurrent.futures import ThreadPoolExecutor

    from mmbridge.testing import build_tiny

    _, processor = build_tiny()
    conv = [{"role": "user", "content": "What color?"}, {"role": "assistant", "content": "red"}]
    expected = processor.encode(conv).input_ids
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: processor.encode(conv).input_ids, range(400)))
    assert all(r == expected for r in results)
