"""`projection_norm`: soft prompts at the frozen LLM's token-embedding scale (modeling/bridge.py)."""

import pytest
import torch

from mmbridge.modeling import MMBridgeModel
from mmbridge.testing import build_tiny


def _norms(model):
    torch.manual_seed(1)
    soft = model.get_image_features(torch.randn(3, 3, 32, 32)).norm(dim=-1)
    tokens = model.get_input_embeddings().weight.norm(dim=-1)
    return soft, tokens


def test_soft_prompts_match_the_token_embedding_scale():
    # init_std 1.0: a random projection then writes vectors ~10x the token embeddings' norm, as a trained
    # bridge did (11.5 vs 0.37 on the shapes model); with the option they come out at the LLM's scale.
    plain, _ = build_tiny(seed=0, init_std=0.5)
    normed, _ = build_tiny(seed=0, init_std=0.5, projection_norm=True)
    soft, tokens = _norms(plain)
    assert soft.mean() > 3 * tokens.mean()
    soft, tokens = _norms(normed)
    assert 0.8 < soft.min() / tokens.mean() and soft.max() / tokens.mean() < 1.25
    assert normed.config.projection_norm_scale == pytest.approx(
        normed.get_input_embeddings().weight.pow(2).mean(-1).sqrt().mean().item(), rel=1e-5)


def test_no_new_weights_and_off_by_default():
    """The normalisation has no parameters: the state dict is that of a plain linear bridge, so importers and
    checkpoints key on the same names; without the option the projection is a plain `nn.Linear`."""
    plain, _ = build_tiny(seed=0)
    normed, _ = build_tiny(seed=0, projection_norm=True)
    assert type(plain.projection) is torch.nn.Linear and not plain.config.projection_norm
    assert plain.state_dict().keys() == normed.state_dict().keys()
    assert all(torch.equal(v, normed.state_dict()[k]) for k, v in plain.state_dict().items())


def test_scale_survives_save_and_load_and_training(tmp_path):
    model, _ = build_tiny(seed=0, init_std=0.5, projection_norm=True)
    scale = model.config.projection_norm_scale
    pixels = torch.randn(2, 3, 32, 32)
    before = model.get_image_features(pixels)
    model.save_pretrained(tmp_path / "full")
    loaded = MMBridgeModel.from_pretrained(tmp_path / "full")
    assert loaded.config.projection_norm and loaded.config.projection_norm_scale == scale
    assert loaded.projection.scale == scale
    torch.testing.assert_close(loaded.get_image_features(pixels), before)
    # a bigger projection (what training drifted to without the option) changes nothing about the scale
    with torch.no_grad():
        loaded.projection.weight.mul_(50)
    soft = loaded.get_image_features(pixels).norm(dim=-1)
    assert torch.allclose(soft, torch.full_like(soft, scale * loaded.config.text_config.hidden_size ** 0.5), rtol=1e-3)


def test_a_given_scale_is_kept_and_a_bad_one_is_refused():
    model, _ = build_tiny(seed=0, projection_norm=True, projection_norm_scale=0.5)
    assert model.config.projection_norm_scale == 0.5 and model.projection.scale == 0.5
    with pytest.raises(ValueError, match="projection_norm_scale"):
        build_tiny(seed=0, projection_norm=True, projection_norm_scale=0.0)


def test_export_to_blip2_says_why_it_cannot():
    from mmbridge.interop.export import plan_export

    model, _ = build_tiny(seed=0, projection_norm=True)
    problems = plan_export(model.config).problems
    assert any("projection_norm" in p for p in problems)
    plain, _ = build_tiny(seed=0)
    assert not any("projection_norm" in p for p in plan_export(plain.config).problems)
