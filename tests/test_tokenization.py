"""`mmbridge.tokenization` is the one home of tokenizer training and the Q-Former text helper;
stage-0 pretraining trains its tokenizers with it."""

from mmbridge.tokenization import SPECIAL_TOKENS, tokenize_qformer_text, train_tokenizer

TEXTS = ["How many shapes are there? 3", "What color is the circle? red",
         "###Human: <Img><ImageHere></Img> Describe the image. ###Assistant: a small red circle###"] * 5


def test_stage0_pretraining_uses_the_one_tokenizer_trainer():
    from mmbridge.pretrain import text

    assert text.train_tokenizer is train_tokenizer
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    assert set(SPECIAL_TOKENS) <= set(tokenizer.get_vocab())
    # one token per word, before punctuation too ("circle?" and "circle " share "circle")
    question, = (tokenizer("the circle?", add_special_tokens=False)["input_ids"],)
    statement = tokenizer("the circle ", add_special_tokens=False)["input_ids"]
    assert question[:2] == statement[:2]
    assert tokenizer.decode(question) == "the circle?"


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
