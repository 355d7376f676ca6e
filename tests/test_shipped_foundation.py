"""The shipped ShapesWorld foundation (the stage-0 models `mmbridge train shapes` starts from, loaded by
path like downloaded weights): complete, small, frozen inside the shipped model bit for bit, and an LM
that reads its own world from text. Thresholds sit a little below what was measured when it was
shipped (docs/recipe.md, "Results: the shipped model")."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionModel, PreTrainedTokenizerFast

from mmbridge.pretrain.recipe import FOUNDATION_PARTS, resolve_foundation

# measured on 100 val scenes: 92.3 % (every attribute type 100 %, relations 54.3 %)
MIN_TEXT_QA_10_SCENES = 0.85


@pytest.fixture(scope="module")
def foundation():
    return resolve_foundation("shipped")


def test_shipped_foundation_has_every_part_within_budget(foundation):
    assert all((foundation / part / "config.json").is_file() or (foundation / part / "tokenizer.json").is_file()
               for part in FOUNDATION_PARTS)
    assert sum(f.stat().st_size for f in foundation.rglob("*") if f.is_file()) <= 16 * 2**20


def test_shipped_model_freezes_the_shipped_foundation_bit_for_bit(foundation):
    from mmbridge.modeling import MMBridgeModel
    from mmbridge.models import resolve_model_path

    model = MMBridgeModel.from_pretrained(resolve_model_path("shapes")).state_dict()
    model = {k.replace(".base_layer.", "."): v for k, v in model.items()}
    for prefix, part in (("llm.model.", AutoModelForCausalLM.from_pretrained(foundation / "lm")),
                         ("vision.model.", CLIPVisionModel.from_pretrained(foundation / "vision")),
                         ("act.text_encoder.", AutoModel.from_pretrained(foundation / "text_encoder"))):
        weights = part.state_dict()
        shared = [k for k in weights if prefix + k in model]
        assert len(shared) > 5
        # the act head's tokens append rows to the LM's embeddings: the LM's own rows must hold
        assert all(torch.equal(model[prefix + k][:len(weights[k])], weights[k]) for k in shared)


def test_shipped_lm_answers_from_the_text_description(foundation):
    from mmbridge.pretrain.shapes import text_qa_accuracy

    tokenizer = PreTrainedTokenizerFast.from_pretrained(foundation / "tokenizer")
    lm = AutoModelForCausalLM.from_pretrained(foundation / "lm").eval()
    accuracy = text_qa_accuracy(lm, tokenizer, num_scenes=10)
    assert accuracy["n"] > 80 and accuracy["all"] >= MIN_TEXT_QA_10_SCENES, accuracy
