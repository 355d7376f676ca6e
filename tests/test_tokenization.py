"""`mmbridge.tokenization` is the one home of tokenizer training and the Q-Former text helper.

Until stage-0 pretraining imports `train_tokenizer` from here, its own copy must agree with this one
exactly: the shipped model's tokenizer was trained by `pretrain.text.train_tokenizer`.
"""

from mmbridge.tokenization import SPECIAL_TOKENS, tokenize_qformer_text, train_tokenizer

TEXTS = ["How many shapes are there? 3", "What color is the circle? red",
         "###Human: <Img><ImageHere></Img> Describe the image. ###Assistant: a small red circle###"] * 5


def test_same_tokenizer_as_stage0_pretraining():
    from mmbridge.pretrain.text import train_tokenizer as stage0_train_tokenizer

    ours, theirs = train_tokenizer(TEXTS, vocab_size=300), stage0_train_tokenizer(TEXTS, vocab_size=300)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.all_special_tokens == theirs.all_special_tokens
    for text in TEXTS[:3]:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert set(SPECIAL_TOKENS) <= set(ours.get_vocab())


def test_qformer_text_inputs_are_first_token_text_eos_right_padded():
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    cls = tokenizer.convert_tokens_to_ids("[DEC]")
    texts = ["a small red circle", "", "What shape is the blue object? " * 20]
    ids, mask = tokenize_qformer_text(tokenizer, texts, cls, max_length=16)
    assert ids.shape == mask.shape == (3, 16) and ids[:, 0].eq(cls).all()
    words = tokenizer("a small red circle", add_special_tokens=False)["input_ids"]
    assert ids[0, :len(words) + 2].tolist() == [cls, *words, tokenizer.eos_token_id]
    assert mask[0].sum() == len(words) + 2 and ids[0, len(words) + 2:].eq(tokenizer.pad_token_id).all()
    assert mask[1].tolist() == [1, 1] + [0] * 14  # [DEC] + EOS, then padding
    assert mask[2].all() and ids[2, -1] == tokenizer.eos_token_id  # truncated to max_length, EOS kept
