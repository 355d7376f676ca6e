"""BLIP-2 stage 1 on a tiny Q-Former: the three attention masks, the losses, and that they learn."""

import itertools

import pytest
import torch

from mmbridge.modeling.qformer import build_qformer_text_mask
from mmbridge.pretrain.qformer import QFormerStageConfig, pretrain_qformer, qformer_losses, retrieval_recall
from mmbridge.testing import build_tiny


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny(seed=0, image_text_hidden_size=16)
    tok = processor.tokenizer
    return model, tok, tok.bos_token_id, tok.convert_tokens_to_ids("[DEC]")


def allowed(mask):
    return mask[0, 0] == 0


def test_causal_mask_queries_see_only_queries_text_sees_queries_and_past():
    text_mask = torch.tensor([[1, 1, 1, 0]])  # last text position is padding
    a = allowed(build_qformer_text_mask(2, text_mask, "causal", torch.float32))
    assert a[:2, :2].all() and not a[:2, 2:].any()  # queries: queries only
    assert a[2:, :2].all()  # text: all queries
    assert a[2:5, 2:5].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert not a[:, 5].any()  # padding is never attended


def test_bidirectional_mask_sees_everything_but_padding():
    a = allowed(build_qformer_text_mask(2, torch.tensor([[1, 1, 0]]), "bidirectional", torch.float32))
    assert a[:, :4].all() and not a[:, 4].any()


def test_bad_mask_mode_is_named():
    with pytest.raises(ValueError, match="causal"):
        build_qformer_text_mask(2, torch.ones(1, 3), "prefix", torch.float32)


def test_itg_cannot_peek_at_future_text(tiny):
    """Changing a later token must not change the logits at earlier positions (the causal mask works)."""
    model, tok, cls, dec = tiny
    feats = torch.randn(1, 5, 32)
    ids = torch.tensor([[dec, 10, 11, 12, 13]])
    other = ids.clone()
    other[0, 3] = 40
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model.qformer.itg_logits(feats, ids, mask)
        b = model.qformer.itg_logits(feats, other, mask)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_text_side_is_optional_and_says_how_to_get_it():
    model, processor = build_tiny(seed=0)
    assert model.qformer.text is None
    with pytest.raises(ValueError, match="image_text_hidden_size"):
        model.qformer.text_embeds(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3))


def test_losses_are_finite_and_duplicate_texts_are_not_negatives(tiny):
    model, tok, cls, dec = tiny
    texts = ["a red circle", "a red circle", "a blue square", "a green cross"]
    out = qformer_losses(model.qformer, torch.randn(4, 5, 32), texts, tok, cls_token_id=cls, dec_token_id=dec,
                         generator=torch.Generator().manual_seed(0))
    assert set(out) == {"itc", "itm", "itg"}
    assert all(torch.isfinite(v) for v in out.values())
    # A batch whose texts are all the same has no negatives: ITM is trained on positives only.
    out = qformer_losses(model.qformer, torch.randn(2, 5, 32), ["x", "x"], tok, cls_token_id=cls,
                         dec_token_id=dec, losses=("itm",))
    assert torch.isfinite(out["itm"])


def test_stage1_learns_to_retrieve_and_roundtrips(tiny, tmp_path):
    """Eight fixed (features, caption) pairs: after a short training, ITC retrieves far above chance (1/8)."""
    model, tok, cls, dec = tiny
    torch.manual_seed(0)
    feats = torch.randn(8, 5, 32)
    texts = [f"a {c} {s}" for c, s in itertools.product(["red", "blue"], ["circle", "square", "cross", "diamond"])]
    batches = itertools.repeat({"image_features": feats, "texts": texts})
    history = pretrain_qformer(model.qformer, batches, tok, QFormerStageConfig(steps=100, lr=1e-2, warmup_steps=5),
                               cls_token_id=cls, dec_token_id=dec, log=lambda _: None)
    assert history[-1]["itc"] < history[0]["itc"] / 2 and history[-1]["itg"] < history[0]["itg"]
    recall = retrieval_recall(model.qformer, feats, texts, tok, cls_token_id=cls)
    assert recall["image_to_text_r1"] >= 0.75 and recall["text_to_image_r1"] >= 0.75

    from mmbridge.modeling import MMBridgeModel

    model.save_pretrained(tmp_path)
    loaded = MMBridgeModel.from_pretrained(tmp_path)
    assert loaded.qformer.text is not None
    assert retrieval_recall(loaded.qformer, feats, texts, tok, cls_token_id=cls) == recall
