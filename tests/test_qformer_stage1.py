"""BLIP-2 stage 1 on a tiny Q-Former: the three attention masks, the losses, and that they learn."""

import itertools

import pytest
import torch

from mmbridge.modeling.qformer import build_qformer_text_mask
from mmbridge.pretrain.qformer import retrieval_recall
from mmbridge.testing import build_tiny
from mmbridge.tokenization import tokenize_qformer_text


def stage1_losses(model, feats, texts, tok, cls, dec, losses=("itc", "itm", "itg")):
    ids, mask = tokenize_qformer_text(tok, texts, cls)
    return model.qformer.stage1_losses(feats, ids, mask, cls_token_id=cls, dec_token_id=dec, losses=losses)


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
    torch.manual_seed(0)
    out = stage1_losses(model, torch.randn(4, 5, 32), texts, tok, cls, dec)
    assert set(out) == {"itc", "itm", "itg"}
    assert all(torch.isfinite(v) for v in out.values())
    # A batch whose texts are all the same has no negatives: ITM is trained on positives only.
    out = stage1_losses(model, torch.randn(2, 5, 32), ["x", "x"], tok, cls, dec, losses=("itm",))
    assert torch.isfinite(out["itm"])


def test_stage1_learns_to_retrieve_and_roundtrips(tiny, tmp_path):
    """Eight fixed (features, caption) pairs: after a short training (200 steps), ITC retrieves far above
    chance (1/8)."""
    model, tok, cls, dec = tiny
    torch.manual_seed(0)
    feats = torch.randn(8, 5, 32)
    texts = [f"a {c} {s}." for c, s in itertools.product(["red", "blue"], ["circle", "square", "cross", "diamond"])]
    optimizer = torch.optim.AdamW(model.qformer.parameters(), lr=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    model.qformer.train()
    history = []
    for _ in range(200):
        parts = stage1_losses(model, feats, texts, tok, cls, dec)
        optimizer.zero_grad()
        sum(parts.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.qformer.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        history.append({k: v.item() for k, v in parts.items()})
    assert history[-1]["itc"] < history[0]["itc"] / 2 and history[-1]["itg"] < history[0]["itg"]
    recall = retrieval_recall(model.qformer, feats, texts, tok, cls_token_id=cls)
    assert recall["image_to_text_r1"] >= 0.75 and recall["text_to_image_r1"] >= 0.75

    from mmbridge.modeling import MMBridgeModel

    model.save_pretrained(tmp_path)
    loaded = MMBridgeModel.from_pretrained(tmp_path)
    assert loaded.qformer.text is not None
    assert retrieval_recall(loaded.qformer, feats, texts, tok, cls_token_id=cls) == recall


@pytest.mark.usefixtures("fresh_accelerate")
def test_stage1_runs_through_the_trainer_with_named_losses_and_resumes(tmp_path):
    """BLIP-2 stage 1 is an ordinary trainer stage: losses itc/itm/itg weighted by the stage config,
    logged one column each, checkpointed; a run stopped at step 2 and resumed ends where a straight run does."""
    import csv

    from mmbridge.train.config import stage_config_from_dict
    from mmbridge.train.fixtures import make_base_model, write_shards
    from mmbridge.train.trainer import Trainer

    make_base_model(tmp_path / "base", qformer_text=True)
    write_shards(tmp_path / "wds", num_shards=1, per_shard=16)

    def stage():
        return stage_config_from_dict({
            "stage": "stage1", "model": str(tmp_path / "base"), "train": ["qformer"],
            "losses": {"itc": 1.0, "itm": 0.5, "itg": 1.0},
            "data": {"batch_size": 4, "datasets": [
                {"name": "caps", "type": "webdataset", "shards": str(tmp_path / "wds" / "shard-0000.tar")}]},
            "schedule": {"total_steps": 4, "warmup_steps": 1, "init_lr": 1e-3, "min_lr": 1e-4},
            "run": {"save_every": 2, "progress_bar": False}})

    straight = Trainer(stage(), tmp_path / "straight").fit()
    assert set(straight["losses"]) == {"itc", "itm", "itg"}
    assert straight["loss"] == pytest.approx(sum(w * straight["losses"][n]
                                                 for n, w in {"itc": 1.0, "itm": 0.5, "itg": 1.0}.items()))
    with (tmp_path / "straight" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"loss_itc", "loss_itm", "loss_itg"} <= set(rows[0]) and len(rows) == 4
    Trainer(stage(), tmp_path / "resumed", max_steps=2).fit()
    resumed = Trainer(stage(), tmp_path / "resumed", resume=True).fit()
    assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-5)

    from mmbridge.modeling import MMBridgeModel

    base = MMBridgeModel.from_pretrained(tmp_path / "base")
    trained = MMBridgeModel.from_pretrained(tmp_path / "straight" / "model")
    assert not torch.equal(base.qformer.text.itm_head.weight, trained.qformer.text.itm_head.weight)
    assert torch.equal(base.projection.weight, trained.projection.weight)  # not in this stage's `train`


@pytest.mark.usefixtures("fresh_accelerate")
def test_an_alignment_stage_can_keep_itc_next_to_the_lm_loss(tmp_path):
    """Retrieval need not be forgotten in stage 2: weight `itc` beside `lm`; both are reported, the
    vision features are computed once for both."""
    from mmbridge.train.config import stage_config_from_dict
    from mmbridge.train.fixtures import make_base_model, write_shards
    from mmbridge.train.trainer import Trainer

    make_base_model(tmp_path / "base", qformer_text=True)
    write_shards(tmp_path / "wds", num_shards=1, per_shard=8)
    stage = stage_config_from_dict({
        "stage": "align", "model": str(tmp_path / "base"), "train": ["qformer", "projection"],
        "losses": {"lm": 1.0, "itc": 0.1},
        "data": {"batch_size": 4, "datasets": [
            {"name": "caps", "type": "webdataset", "shards": str(tmp_path / "wds" / "shard-0000.tar")}]},
        "schedule": {"total_steps": 2, "warmup_steps": 1, "init_lr": 1e-3, "min_lr": 1e-4},
        "run": {"progress_bar": False}})
    result = Trainer(stage, tmp_path / "run").fit()
    assert set(result["losses"]) == {"lm", "itc"}
    assert result["loss"] == pytest.approx(result["losses"]["lm"] + 0.1 * result["losses"]["itc"])
