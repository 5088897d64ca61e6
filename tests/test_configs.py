"""Presets and their TOML mirrors in configs/models/ stay equal; diffusers configs translate or are refused."""
import pytest

from models.presets import (CONFIG_DIR, PRESETS, load_toml, to_toml, unet_config_from_diffusers,
                            vae_config_from_diffusers)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_toml_mirrors_preset(name):
    assert load_toml(CONFIG_DIR / f"{name}.toml") == PRESETS[name]


def test_every_toml_is_a_preset():
    assert {p.stem for p in CONFIG_DIR.glob("*.toml")} == set(PRESETS)


def test_toml_roundtrip(tmp_path):
    for cfg in PRESETS.values():
        (tmp_path / "c.toml").write_text(to_toml(cfg))
        assert load_toml(tmp_path / "c.toml") == cfg


def test_unknown_toml_key(tmp_path):
    (tmp_path / "c.toml").write_text('family = "sd-v1"\n[unet]\nchannels = 3\n')
    with pytest.raises(ValueError, match="unknown UNetConfig keys: channels"):
        load_toml(tmp_path / "c.toml")


SD15_UNET = {"act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
             "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
             "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
             "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}


def test_sd15_unet_config_is_the_preset():
    assert unet_config_from_diffusers(SD15_UNET) == PRESETS["sd-v1"].unet


def test_sd2_unet_configs_are_the_presets():
    """stable-diffusion-2-1-base and -2-1 unet/config.json (sd2-sdxl.md §2.2): per-level heads, linear projections."""
    base = {**SD15_UNET, "use_linear_projection": True, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20]}
    assert unet_config_from_diffusers(base) == PRESETS["sd2-base"].unet
    assert unet_config_from_diffusers({**base, "sample_size": 96, "upcast_attention": True}) == PRESETS["sd2"].unet


def test_sdxl_unet_config_is_the_preset():
    """stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (sd2-sdxl.md §3.1)."""
    sdxl = {**SD15_UNET, "use_linear_projection": True, "transformer_layers_per_block": [1, 2, 10],
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "addition_embed_type_num_heads": 64,
            "projection_class_embeddings_input_dim": 2816, "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048, "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "upcast_attention": None}
    assert unet_config_from_diffusers(sdxl) == PRESETS["sdxl"].unet
    with pytest.raises(ValueError, match="addition_embed_type='text'.*Stable Diffusion v1.x, 2.x and XL"):
        unet_config_from_diffusers({**sdxl, "addition_embed_type": "text"})


def test_sd15_vae_config_is_the_preset():
    vae = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
           "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
    assert vae_config_from_diffusers(vae) == PRESETS["sd-v1"].vae
