"""Reference models for tests: diffusers / transformers modules in our preset configs, random weights.

`reference_pipeline` builds a diffusers `StableDiffusionPipeline` whose every network has the shape of
one of our presets, with an SD-configured `DDIMScheduler`. Saved with `save_pretrained`, it is a
diffusers folder exactly like the public ones, only small. `ours_from_reference` builds our Pipeline
holding the same weights.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models import clip as ours_clip, tokenizer as ours_tokenizer, unet as ours_unet, vae as ours_vae
from models.ddim import DDIMConfig
from models.presets import PRESETS, ModelConfig
from p2p.core.pipeline import Pipeline

SD_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)


def tiny_sd2(prediction: str = "epsilon", upcast: bool = True) -> ModelConfig:
    """tiny-sd2 predicting `prediction` ("epsilon" or "v_prediction"); upcast=False for float64 runs, where diffusers'
    upcast_attention would compute Q K^T in float32 (it casts q and k to float32, whatever their dtype)."""
    cfg = PRESETS["tiny-sd2"]
    return replace(cfg, ddim=DDIMConfig(prediction_type=prediction), unet=replace(cfg.unet, upcast_attention=upcast))


def reference_unet(cfg) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    return UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down)),
        cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.heads if isinstance(cfg.heads, int) else tuple(cfg.heads),
        norm_num_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        transformer_layers_per_block=cfg.transformer_layers if isinstance(cfg.transformer_layers, int)
        else tuple(cfg.transformer_layers),
        **(dict(addition_embed_type="text_time", addition_time_embed_dim=cfg.addition_time_embed_dim,
                projection_class_embeddings_input_dim=cfg.projection_class_embeddings_input_dim)
           if cfg.addition_time_embed_dim else {})).eval()


def reference_vae(cfg) -> AutoencoderKL:
    n = len(cfg.block_out_channels)
    return AutoencoderKL(block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n).eval()


def reference_text_encoder(cfg) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()


def reference_pipeline(tokenizer_dir, cfg: ModelConfig = PRESETS["tiny"], seed: int = 0,
                       out_scale: float = 20.0) -> StableDiffusionPipeline:
    """`out_scale` widens conv_out (PyTorch's default init leaves it tiny): x20 gives outputs of std ~6.5."""
    torch.manual_seed(seed)
    unet, vae, text = reference_unet(cfg.unet), reference_vae(cfg.vae), reference_text_encoder(cfg.text)
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
    pad = {"pad_token": "!"} if cfg.family == "sd-v2" else {}  # SD 2's tokenizer: special_tokens_map.json
    tok = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"), model_max_length=77,
                        **pad)
    scheduler = DDIMScheduler(**SD_DDIM, prediction_type=cfg.ddim.prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_from_reference(ref: StableDiffusionPipeline, cfg: ModelConfig, tokenizer_dir):
    """Our Pipeline holding the same weights as a diffusers reference pipeline (text keys lose 'text_model.')."""
    modules = []
    for cls, c, src in ((ours_unet.UNet, cfg.unet, ref.unet), (ours_vae.AutoencoderKL, cfg.vae, ref.vae),
                        (ours_clip.CLIPTextModel, cfg.text, ref.text_encoder)):
        with torch.device("meta"):
            m = cls(c)
        m.load_state_dict({k.removeprefix("text_model."): v for k, v in src.state_dict().items()},
                          strict=True, assign=True)
        modules.append(m)
    tok = (ours_tokenizer.OpenCLIPTokenizer if cfg.family == "sd-v2" else ours_tokenizer.CLIPTokenizer)
    return Pipeline(cfg, *modules, tok.from_path(tokenizer_dir))


def reference_xl_pipeline(tokenizer_dir, cfg: ModelConfig = PRESETS["tiny-sdxl"], seed: int = 0):
    """A diffusers StableDiffusionXLPipeline of our SDXL preset's shapes (random weights, SD-configured DDIM, no
    watermark), its tokenizer_2 padded with "!" as the hub's (special_tokens_map.json)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet, v = reference_unet(cfg.unet), cfg.vae
    vae = AutoencoderKL(block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
                        latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups,
                        down_block_types=("DownEncoderBlock2D",) * len(v.block_out_channels),
                        up_block_types=("UpDecoderBlock2D",) * len(v.block_out_channels),
                        scaling_factor=v.scaling_factor, force_upcast=True).eval()
    text = reference_text_encoder(cfg.text.clip)
    g = cfg.text.open_clip
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=g.vocab_size, hidden_size=g.hidden_size, intermediate_size=g.intermediate_size,
        num_hidden_layers=g.num_hidden_layers, num_attention_heads=g.num_attention_heads,
        max_position_embeddings=g.max_position_embeddings, hidden_act=g.hidden_act, layer_norm_eps=g.layer_norm_eps,
        projection_dim=g.projection_dim, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(20)
    files = str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt")
    tok, tok_2 = CLIPTokenizer(*files, model_max_length=77), CLIPTokenizer(*files, model_max_length=77, pad_token="!")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                     tokenizer_2=tok_2, unet=unet, scheduler=DDIMScheduler(**SD_DDIM),
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
