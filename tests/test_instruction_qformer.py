"""InstructBLIP's instruction-aware Q-Former: the processor hands each image its message's text, the
queries read it, and generation / chat / training paths all pass it along."""

import pytest
import torch

from mmbridge.generation import MMBridgePipeline
from mmbridge.testing import build_tiny


@pytest.fixture(scope="module")
def instruct():
    model, processor = build_tiny(seed=0, init_std=0.5, image_text_hidden_size=16, qformer_instruction=True)
    processor.qformer_cls_token_id = processor.tokenizer.bos_token_id
    return model.eval(), processor


def user(text, images=1):
    return {"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}


def test_processor_gives_each_image_its_messages_text(instruct, images):
    model, processor = instruct
    conversations = [[user("What color is the circle?", images=2)], [user("How many?")]]
    batch = processor(conversations, images=images, add_generation_prompt=True)
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    assert ids.shape[0] == batch["pixel_values"].shape[0] == 3
    assert (ids[:, 0] == processor.tokenizer.bos_token_id).all()
    texts = [processor.tokenizer.decode(row[m.bool()][1:], skip_special_tokens=True) for row, m in zip(ids, mask)]
    assert texts == ["What color is the circle?", "What color is the circle?", "How many?"]


def test_plain_processor_adds_nothing(tiny_pipeline, images):
    batch = tiny_pipeline.processor([user("hi")], images=images[:1])
    assert "qformer_input_ids" not in batch


def test_queries_depend_on_the_instruction(instruct, images):
    model, processor = instruct
    a = processor([user("What color is the circle?")], images=images[:1])
    b = processor([user("How many shapes are there?")], images=images[:1])
    with torch.no_grad():
        fa = model.get_image_features(a["pixel_values"], a["qformer_input_ids"], a["qformer_attention_mask"])
        fb = model.get_image_features(b["pixel_values"], b["qformer_input_ids"], b["qformer_attention_mask"])
    assert not torch.allclose(fa, fb)
    with pytest.raises(ValueError, match="qformer_input_ids"):
        model.get_image_features(a["pixel_values"])


def test_padding_the_instruction_changes_nothing(instruct, images):
    """A short instruction batched next to a long one gives the same soft prompt as alone."""
    model, processor = instruct
    alone = processor([user("How many?")], images=images[:1])
    batched = processor([[user("How many?")], [user("What color is the large blue square on the left?")]],
                        images=images[:2])
    with torch.no_grad():
        fa = model.get_image_features(alone["pixel_values"], alone["qformer_input_ids"],
                                      alone["qformer_attention_mask"])
        fb = model.get_image_features(batched["pixel_values"], batched["qformer_input_ids"],
                                      batched["qformer_attention_mask"])
    torch.testing.assert_close(fa[0], fb[0], atol=1e-5, rtol=1e-5)


def test_batched_generation_and_kv_chat_match_single_answers(instruct, images):
    model, processor = instruct
    pipe = MMBridgePipeline(model, processor)
    questions = ["What color is the circle?", "How many shapes are there?"]
    batched = pipe.generate([[user(q)] for q in questions], images=images[:2], max_new_tokens=6)
    for q, img, result in zip(questions, images, batched):
        [alone] = pipe.generate([user(q)], images=[img], max_new_tokens=6)
        assert alone.token_ids == result.token_ids
        chat = pipe.chat(max_new_tokens=6)
        assert chat.ask(q, images=[img]).token_ids == result.token_ids


def test_training_loss_flows_into_the_instruction_path(instruct, images):
    model, processor = instruct
    messages = [user("What color is the circle?"), {"role": "assistant", "content": "red"}]
    batch = processor([messages], images=images[:1], return_labels=True)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    model.eval()
    assert model.qformer.text.embeddings.word_embeddings.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_truncation_drops_the_cut_images_instructions(instruct, images):
    model, processor = instruct
    long = [user("first"), {"role": "assistant", "content": "x " * 10}, user("second")]
    processor.max_length = 30
    try:
        batch = processor([long], images=images[:2], truncation=True)
    finally:
        processor.max_length = None
    assert batch["qformer_input_ids"].shape[0] == batch["pixel_values"].shape[0] == 1


def test_instruction_needs_the_text_side():
    with pytest.raises(ValueError, match="image_text_hidden_size"):
        build_tiny(qformer_instruction=True)
