"""The stage-0 LM's text (issue 13): content lookup instead of position, balanced question types,
one token per word, the retrieval check and the gate before the LM is frozen."""

import random
import re
from collections import Counter

import pytest
import torch

from mmbridge.data.shapes.annotations import description, relation_facts
from mmbridge.data.shapes.dataset import eval_questions
from mmbridge.data.shapes.world import make_scene, relation
from mmbridge.pretrain.shapes import (
    END,
    LMGateFailed,
    attribute_sentences,
    balanced_questions,
    chat_text,
    check_lm_gate,
    lm_corpus,
    lm_description,
    lm_samples,
    lookup_check,
    object_words,
    qa_turns,
    relation_sentences,
    relative_sentences,
    retrieval_check,
    shape_word_targets,
)
from mmbridge.pretrain.text import LMConfig, build_causal_lm, encode_segments, train_tokenizer

SCENES = [make_scene("train", i, 0) for i in range(200)]
MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SENTENCE = re.compile(r"The (.+?) is (.+) the (.+)\.")


def canonical_facts(scene, sentences: list[str]) -> set[tuple]:
    """Each sentence as (earlier object, later object, relation words as seen from the earlier one)."""
    order = [o.name for o in scene.objects]
    facts = set()
    for sentence in sentences:
        a, words, b = SENTENCE.fullmatch(sentence).groups()
        words = words.split(" and ")
        if order.index(a) > order.index(b):
            a, b, words = b, a, [MIRROR[w] for w in words]
        facts.add((a, b, tuple(words)))
    return facts


def test_relation_sentences_state_every_fact_both_ways_round_in_random_order():
    """Run r7: each pair once, in a random direction, made a relation answer the XOR of the stated
    direction and the stated word; both ways round it is a lookup of the sentence "The A is … the B."."""
    reordered = 0
    for k, scene in enumerate(SCENES):
        fixed, shuffled = relation_facts(scene), relation_sentences(scene, random.Random(k))
        assert len(shuffled) == 2 * len(fixed) == len(set(shuffled))
        assert canonical_facts(scene, shuffled) == canonical_facts(scene, fixed)
        for sentence in shuffled:
            a, words, b = SENTENCE.fullmatch(sentence).groups()
            mirrored = " and ".join(MIRROR[w] for w in words.split(" and "))
            assert f"The {b} is {mirrored} the {a}." in shuffled
        reordered += len(fixed) > 1 and [s for s in shuffled if s in fixed] != fixed
    assert reordered > 20


def test_lm_dialogues_ask_extra_relation_questions():
    asks_relation = re.compile(r"(left of|right of|above|below) the \w+ \w+\?")
    samples = lm_samples(random.Random(1), 40)
    per_scene = [sum(bool(asks_relation.search(branch[0][0])) for branch in sample.branches) for sample in samples]
    related = [" is left of " in s.text() or " above " in s.text() for s in samples]
    with_pairs = [n for n, r in zip(per_scene, related) if r]
    assert len(with_pairs) > 20 and min(with_pairs) >= 2  # two extra, besides the balanced turns' share


def test_lm_description_keeps_the_head_of_the_description():
    for k, scene in enumerate(SCENES[:50]):
        text, fixed = lm_description(scene, random.Random(k)), object_words(description(scene))
        assert text.split(". The ")[0] == fixed.split(". The ")[0]
        assert text.count(". The ") == 2 * fixed.count(". The ")


def test_every_object_is_one_word_in_the_lm_description():
    """Run r6: one token per object makes every attribute question a one-hop lookup."""
    assert object_words("a large red circle left of the small blue square.") == \
        "a largeredcircle left of the smallbluesquare."
    for k, scene in enumerate(SCENES[:50]):
        text = lm_description(scene, random.Random(k))
        for o in scene.objects:
            assert o.size + o.color + o.shape in text and o.name not in text


def test_lm_chats_train_the_shuffled_description_and_the_answers_only():
    sample = lm_samples(random.Random(0), 1)[0]
    assert [on for _, on in sample.prefix] == [False, True] and sample.prefix[1][0].startswith("There ")
    for branch in sample.branches:
        assert [on for _, on in branch] == [False, True] and branch[1][0].endswith(END)
    assert sample.text().startswith("###Human: <Img>There ")


ATTRIBUTE = re.compile(r"The (\w+) is (\w+) and (\w+)\.|The (\w+) one is an? (\w+)\.|The (\w+) (\w+) is (\w+)\.")
RELATIVE = re.compile(r"Compared with the (\w+) (\w+), the (\w+) (\w+) is (.+)\.")


def test_restatements_are_true_and_name_what_they_ask_first():
    """The dialogue's "Describe each shape." / "Where are the shapes…?" answers restate the
    description in the questions' orders (shape -> size and colour, colour -> shape, both names ->
    relation): every sentence is true and only asked where its names pick out one object."""
    seen = Counter()
    for k, scene in enumerate(SCENES):
        rng = random.Random(k)
        for sentence in filter(None, attribute_sentences(scene, rng).split(". ")):
            m = ATTRIBUTE.fullmatch(sentence.rstrip(".") + ".")
            if m[1]:
                (o,) = scene.find(shape=m[1])
                assert (o.size, o.color) == (m[2], m[3])
                seen["shape->size,colour"] += 1
            elif m[4]:
                (o,) = scene.find(color=m[4])
                assert o.shape == m[5]
                seen["colour->shape"] += 1
            else:
                (o,) = scene.find(m[6], m[7])
                assert o.size == m[8]
                seen["name->size"] += 1
        for sentence in filter(None, relative_sentences(scene, rng).split(". ")):
            c2, s2, c1, s1, words = RELATIVE.fullmatch(sentence.rstrip(".") + ".").groups()
            (b,), (a,) = scene.find(c2, s2), scene.find(c1, s1)
            expect = {"to the left": ("x", 1), "to the right": ("x", -1), "above": ("y", 1), "below": ("y", -1)}
            assert all(relation(a, b, expect[w][0]) == expect[w][1] for w in words.split(" and "))
            seen["relative"] += 1
    assert min(seen.values()) > 50 and len(seen) == 4


def test_restatements_are_their_own_branches_so_questions_cannot_read_them():
    sample = lm_samples(random.Random(3), 1)[0]
    questions = [branch[0][0] for branch in sample.branches]
    assert any("Describe each shape." in q for q in questions)
    assert "Compared with" not in "".join(t for t, _ in sample.prefix)


def test_balanced_questions_draw_the_type_first():
    pool = [{"type": "relation", "q": i} for i in range(40)] + [{"type": "color", "q": 0}, {"type": "count", "q": 0}]
    first = Counter(balanced_questions(pool, random.Random(seed), 1)[0]["type"] for seed in range(600))
    assert all(150 < first[t] < 250 for t in ("color", "count", "relation"))  # not 40 : 1 : 1
    picked = balanced_questions(pool, random.Random(0), 10)
    assert len({id(q) for q in picked}) == 10  # without repeats
    assert len(balanced_questions(pool[:2], random.Random(0), 5)) == 2  # never more than the pool


def test_lookup_questions_come_from_large_scenes_about_as_often_as_in_the_eval():
    """Issue 13 (b): uniform draws from the pool gave colour questions 41 % from 1-object scenes (eval: 16 %)."""
    train, evaluation = Counter(), Counter()
    rng = random.Random(0)
    for scene in SCENES:
        objects = len(scene.objects)
        for question, _ in qa_turns(scene, rng, 8):
            if question.startswith("What color is the "):
                train[objects] += 1
        evaluation.update(objects for q in eval_questions(scene) if q["type"] == "color")
    share = {n: train[n] / sum(train.values()) for n in train}
    eval_share = {n: evaluation[n] / sum(evaluation.values()) for n in evaluation}
    assert share[1] < 0.25 and share[3] + share[4] > 0.45
    assert abs(share[1] - eval_share[1]) < 0.1


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(lm_corpus(200), vocab_size=512)


def test_tokenizer_round_trips_our_texts_exactly(tokenizer):
    texts = lm_corpus(100, seed=1) + [
        "###Human: <Img><ImageHere></Img> What color is the ünïcode? ###Assistant: red###",
        "[INST] Is it red? [/INST] red </s>"]  # the space before a special token stays
    for text in texts:
        assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_a_word_is_the_same_token_before_a_space_and_before_punctuation(tokenizer):
    tokens = tokenizer.tokenize("Is there a red triangle? ###Assistant: red###The red triangle is small.")
    assert tokens.count("triangleĠ") == 2 and tokens.count("redĠ") == 3
    assert tokenizer.convert_tokens_to_ids("<ImageHere>") == 4
    assert tokenizer.tokenize("<Img><ImageHere></Img>").count("<ImageHere>") == 1


def test_prompt_tokens_are_a_prefix_of_the_conversation(tokenizer):
    rng = random.Random(0)
    for scene in SCENES[:30]:
        for question, answer in qa_turns(scene, rng, 3):
            prompt = "".join(t for t, _ in chat_text(description(scene), [(question, "")]))[:-len(END)]
            ids = tokenizer(prompt)["input_ids"]
            assert tokenizer(prompt + answer + END)["input_ids"][:len(ids)] == ids


def test_retrieval_check_targets_shape_words_that_the_text_determines(tokenizer):
    for k, scene in enumerate(SCENES[:50]):
        text, offsets = shape_word_targets(scene, random.Random(k))
        named = [(o.size, o.color) for o in scene.objects]
        for offset in offsets:
            size, color = text[:offset].split()[-2:]
            shape = re.match(r"\w+", text[offset:])[0]
            assert named.count((size, color)) == 1
            assert scene.find(color, shape)[0].size == size
            assert offset > text.index(". The ")  # in a relation sentence, not the list of objects
    lm = build_causal_lm(tokenizer, LMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64))
    result = retrieval_check(lm.eval(), tokenizer, num_scenes=8)
    assert result["n"] > 8 and 0 <= result["acc"] <= 1 and torch.isfinite(torch.tensor(result["loss"]))


def test_text_qa_prompts_are_tokenized_segment_by_segment_as_in_training(tokenizer):
    """Whole-string tokenization glues the description's last "." to "</" — a token training never shows."""
    scene = SCENES[0]
    segments = chat_text(description(scene), [("How many shapes are there?", "")])[:-1]
    whole = tokenizer("".join(t for t, _ in segments))["input_ids"]
    assert encode_segments(tokenizer, segments)[0] != whole
    assert ".</" in tokenizer.convert_ids_to_tokens(whole)


ACCURACY = {"all": 0.985, "n": 900, "color": 0.99, "count": 1.0, "exists": 0.96, "relation": 0.97}


def test_lm_gate_passes_a_good_lm_and_names_what_fails():
    check_lm_gate(ACCURACY, 0.98, 0.95)
    with pytest.raises(LMGateFailed, match=r"98\.5 %.*exists 96\.0.*99 % overall") as err:
        check_lm_gate(ACCURACY, 0.99, 0.95)
    assert "lm_gate.min_accuracy=0" in str(err.value)
    with pytest.raises(LMGateFailed, match="95 % per type"):
        check_lm_gate({**ACCURACY, "exists": 0.9}, 0.98, 0.95)
    check_lm_gate({**ACCURACY, "all": 0.2, "exists": 0.5}, 0, 0)  # the smoke recipe's setting


def test_branches_are_trained_exactly_as_if_each_followed_the_prefix_alone(tokenizer):
    from mmbridge.pretrain.text import encode_samples

    sample = lm_samples(random.Random(0), 1)[0]
    assert len(sample.branches) > 2 and all(b[0][0].startswith("</Img> ") for b in sample.branches)
    lm = build_causal_lm(tokenizer, LMConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)).eval()
    batch = encode_samples(tokenizer, [sample, "a plain row"], max_length=448)
    labels = batch.pop("labels")
    logits = lm(**batch).logits[0]
    prefix = len(encode_segments(tokenizer, sample.prefix)[0])
    start = prefix
    for branch in sample.branches:
        ids, branch_labels = encode_segments(tokenizer, [*sample.prefix, *branch, (tokenizer.eos_token, True)])
        alone = lm(input_ids=torch.tensor([ids])).logits[0]
        n = len(ids) - prefix
        assert torch.allclose(logits[start:start + n], alone[prefix:], atol=1e-5)
        assert labels[0, start:start + n].tolist() == branch_labels[prefix:]
        start += n
    n = len(encode_segments(tokenizer, [("a plain row", True), (tokenizer.eos_token, True)])[0])
    plain = lm(input_ids=batch["input_ids"][1:2, :n]).logits[0]
    assert torch.allclose(lm(**{k: v[1:] for k, v in batch.items()}).logits[0, :n], plain, atol=1e-5)


class _AttributeOracle(torch.nn.Module):
    """Logits right about the next token only where it is an attribute word (a size, colour, shape
    or relation word): the check scores 1.0 only if it looks at those words and nothing else."""

    def __init__(self, words: set[int]):
        super().__init__()
        self.words = words

    def forward(self, input_ids, **_):
        logits = torch.zeros((*input_ids.shape, 1024))
        logits[..., 0] = 1.0  # wrong everywhere by default
        for t in range(input_ids.shape[1] - 1):
            nxt = int(input_ids[0, t + 1])
            if nxt in self.words:
                logits[0, t, nxt] = 2.0
        return type("Out", (), {"logits": logits})()


def test_lookup_check_scores_each_lookup_at_its_attribute_word(tokenizer):
    from mmbridge.data.shapes.world import COLORS, SHAPES, SIZES

    words = {tokenizer(f"{w}.", add_special_tokens=False)["input_ids"][0]  # a word's first token
             for w in (*COLORS, *SHAPES, *SIZES, "to", "above", "below")}
    result = lookup_check(_AttributeOracle(words), tokenizer, num_scenes=30)
    assert set(result) == {"shape->size", "shape->color", "color->shape", "name->size", "names->relation"}
    assert all(v == 1.0 for v in result.values())
    assert all(v == 0.0 for v in lookup_check(_AttributeOracle(set()), tokenizer, num_scenes=30).values())


def test_lm_pretraining_killed_midway_resumes_to_the_same_weights(tokenizer, tmp_path):
    """The foundation's LM stage runs for hours: a kill after a save loses only the steps since."""
    cfg = LMConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=6, batch_size=2,
                   warmup_steps=1, save_every=3, seed=0)

    def straight_samples(rng, n):
        return lm_samples(rng, n)

    calls = []

    def dying_samples(rng, n):
        calls.append(1)
        if len(calls) == 5:  # step 5: after the save at step 3
            raise KeyboardInterrupt
        return lm_samples(rng, n)

    straight = build_causal_lm(tokenizer, cfg)
    from mmbridge.pretrain.text import pretrain_causal_lm

    pretrain_causal_lm(straight, tokenizer, straight_samples, cfg, log=lambda d: None)
    resumed = build_causal_lm(tokenizer, cfg)
    with pytest.raises(KeyboardInterrupt):
        pretrain_causal_lm(resumed, tokenizer, dying_samples, cfg, log=lambda d: None, checkpoint_dir=tmp_path / "ck")
    assert (tmp_path / "ck" / "state.pt").is_file()
    logs = []
    resumed = build_causal_lm(tokenizer, cfg)  # a fresh process: weights come from the checkpoint
    losses = pretrain_causal_lm(resumed, tokenizer, straight_samples, cfg, log=logs.append,
                                checkpoint_dir=tmp_path / "ck")
    assert {"resumed_at_step": 3} in logs and len(losses) == 3
    expected = straight.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in resumed.state_dict().items())


class _SaysNo:
    """An LM that answers "no" to everything: the relation prior run r6 had learnt."""

    def __init__(self, tokenizer):
        self.answer = torch.tensor(tokenizer("no###", add_special_tokens=False)["input_ids"])

    def generate(self, input_ids, **_):
        return torch.cat([input_ids, self.answer.expand(len(input_ids), -1)], dim=1)


def test_relation_breakdown_exposes_an_lm_that_answers_the_prior(tokenizer):
    from mmbridge.pretrain.shapes import relation_breakdown

    result = relation_breakdown(_SaysNo(tokenizer), tokenizer, num_scenes=20)
    assert result["answer_no"] == 1.0 and result["answer_yes"] == 0.0 and result["said_no"] == 1.0
    assert 0.3 < result["all"] < 0.7 and {"objects_2", "objects_3", "objects_4"} <= set(result)
