"""Tokenizer training and tokenizer helpers, with no model code: used by stage-0 pretraining, the
processor, evaluation and the test kit alike (so none of them has to import another layer for it).

`train_tokenizer` is the byte-level BPE the shipped ShapesWorld model was trained with;
`tokenize_qformer_text` builds the Q-Former's text inputs (BERT's [CLS] … [SEP] / BLIP-2's [DEC] … [SEP]).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: "[DEC]" starts the Q-Former's text in ITG (BLIP-2 adds it to BERT's vocabulary); the LM never sees it.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<ImageHere>", "[DEC]"]


def byte_level_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Words keep their *trailing* whitespace ("Assistant: " -> "Assistant:Ġ").

    GPT-2-style pre-tokenization glues a space to the *next* word, so a prompt ending in a space
    ("###Assistant: ", MiniGPT-4's template) tokenizes differently from the same prompt followed by
    its answer ("…:", "Ġred" vs "…:", "Ġ"), and a model trained on whole conversations then never
    sees the prompt's last token. With trailing whitespace the prompt's tokens are a prefix of the
    conversation's tokens.

    Punctuation is split from words ("circle." -> "circle", ".Ġ") so a word is the same token at the
    end of a sentence, before a question mark and in a list — one less thing a small LM must learn.
    """
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+\s*|[^\w\s]+\s*|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


#: Where a word touches punctuation ("circle?", "red###"): a space goes in before tokenizing and
#: comes out again when decoding. Not before "<": special tokens ("</s>") never pass the normalizer,
#: but do pass the decoder, which would eat the space of "red </s>".
WORD_PUNCT = r"(?<=\w)(?=[^\w\s<])"
SPACED_WORD_PUNCT = r"(?<=\w) (?=[^\w\s<])"


def word_token_normalizer() -> normalizers.Normalizer:
    """Every word ends in its trailing space ("circle?" -> "circle ?"), so it is one token everywhere.

    With trailing-space pre-tokenization alone, "triangle?" gives `triangle` while the description
    has `triangleĠ`, and an answer "red###" gives `red` while the context has `redĠ`: two unrelated
    embeddings for one word, so an answer could never be a copy of a context token.
    """
    return normalizers.Replace(Regex(WORD_PUNCT), " ")


def word_token_decoder() -> decoders.Decoder:
    """Undoes `word_token_normalizer`: exact round trip for texts without a space between a word and
    the punctuation after it (all of ours)."""
    return decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Replace(Regex(SPACED_WORD_PUNCT), "")])


#: A word at the very end of a text. `word_token_normalizer` leaves it alone (a trained LM's answers end
#: that way before "</s>"), so "a red circle" ends in the pieces `ci r c le`, not the word's token.
TEXT_FINAL_WORD = r"(?<=\w)\z"


def with_final_word_token(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A copy of `tokenizer` whose last word, too, becomes its word token ("a red circle" -> ... `circleĠ`,
    as in "a red circle." and mid-sentence) — CLIP's BPE ends every word in `</w>`, the last one included.

    For a text encoder that conditions a generator on prompts users type without a final period: with the
    plain tokenizer the last word — in "a small red circle", the shape — arrives as pieces the text tower
    never saw in training (its captions end in "background."), and the generator could not read it."""
    import copy
    import json

    new = copy.deepcopy(tokenizer)
    backend = new.backend_tokenizer
    if json.dumps(TEXT_FINAL_WORD)[1:-1] not in backend.to_str():  # once: the rule as the JSON spells it
        final = normalizers.Replace(Regex(TEXT_FINAL_WORD), " ")
        backend.normalizer = final if backend.normalizer is None else normalizers.Sequence([backend.normalizer, final])
    return new


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any input text is encodable) with the special tokens mmbridge expects, one token
    per word wherever the word appears (`word_token_normalizer`). A saved tokenizer keeps the rules it
    was trained with (the shipped `shapes` model's predates the word-token normalizer)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = word_token_normalizer()
    tokenizer.pre_tokenizer = byte_level_pre_tokenizer()
    tokenizer.decoder = word_token_decoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>",
                                   additional_special_tokens=["<ImageHere>", "[DEC]"])


def tokenize_qformer_text(tokenizer, texts: Sequence[str], first_token_id: int,
                          max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`first_token` + text + EOS, right-padded: BERT's [CLS] … [SEP] / BLIP-2's [DEC] … [SEP].
    Returns (input_ids, attention_mask)."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length - 2]
        rows.append([first_token_id] + ids + [tokenizer.eos_token_id])
    width = max((len(r) for r in rows), default=0)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows],
                        dtype=torch.long).reshape(len(rows), width)
    return ids, mask
