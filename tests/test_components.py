"""Components load by kind from local directories: transformers Auto classes and diffusers models."""

import pytest
import torch

from mmbridge.modeling.components import load_component


def test_diffusers_components_load_by_kind(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    DDIMScheduler(num_train_timesteps=100).save_pretrained(tmp_path / "scheduler")

    loaded = load_component("unet", tmp_path, subfolder="unet")
    assert isinstance(loaded, UNet2DConditionModel)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), loaded.state_dict().values()))
    assert isinstance(load_component("vae", tmp_path / "vae", dtype=torch.float16), AutoencoderKL)
    assert load_component("vae", tmp_path / "vae", dtype=torch.float16).dtype == torch.float16
    scheduler = load_component("scheduler", tmp_path / "scheduler")
    assert scheduler.config.num_train_timesteps == 100


def test_transformers_components_and_clear_errors(tmp_path):
    from mmbridge.testing import build_tiny

    model, _ = build_tiny()
    model.llm.model.save_pretrained(tmp_path / "llm")
    llm = load_component("llm", tmp_path / "llm")
    assert type(llm) is type(model.llm.model)
    with pytest.raises(FileNotFoundError, match="local directories only"):
        load_component("unet", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown component kind"):
        load_component("controlnet", tmp_path)
