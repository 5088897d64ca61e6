"""Reference models for tests: diffusers / transformers modules in our preset configs, random weights.

`reference_pipeline` builds a diffusers `StableDiffusionPipeline` whose every network has the shape of
one of our presets, with an SD-configured `DDIMScheduler`. Saved with `save_folder`, it is a
diffusers folder exactly like the public ones, only small; `compvis_unet_vae` writes its networks in a
CompVis single file's names instead. `ours_from_reference` builds our Pipeline holding the same weights.
The loading tests read such files back and compare (`unet_err`, `decode_err`), and check the real
checkpoints' layouts from their key lists (`fixture_keys`, on `meta` tensors).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models import clip as ours_clip, tokenizer as ours_tokenizer, unet as ours_unet, vae as ours_vae
from models.checkpoint import UNET_RESNET_RENAMES, VAE_RENAMES, load_module, rename, unet_prefixes, vae_prefixes
from models.ddim import DDIMConfig
from models.presets import PRESETS, ModelConfig
from p2p.core.pipeline import Pipeline
from p2p.files.loading import split_single_file

SD_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)
FIXTURES = Path(__file__).parent / "fixtures"


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


# --- files to read back: diffusers folders, CompVis single files, the real layouts' key lists ---------------

def save_folder(pipe, path) -> Path:
    """`pipe` written as a diffusers folder of safetensors files, laid out as the public ones; returns the path."""
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def update_json(path: Path, **changes) -> None:
    """Rewrite a folder's JSON config with `changes` (to see how the loader reads an unusual one)."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def compvis_unet_vae(unet, vae, cfg: ModelConfig) -> dict:
    """A diffusers UNet and VAE in a CompVis single file's names ("model.diffusion_model.", "first_stage_model."),
    by inverting our rename tables; the tests check the result against diffusers' converters. The VAE's attention
    projections become the 1x1 convolutions the original files hold."""
    up = {v: k for k, v in unet_prefixes(cfg.unet).items()}
    us = {v: k for k, v in UNET_RESNET_RENAMES.items()}
    vp = {v: k for k, v in vae_prefixes(len(cfg.vae.block_out_channels)).items()}
    vs = {v: k for k, v in VAE_RENAMES.items()}
    sd = {"model.diffusion_model." + rename(k, up, us): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        k = rename(k, vp, vs)
        sd["first_stage_model." + k] = v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v
    return sd


def sd_betas(dtype=torch.float32) -> torch.Tensor:
    """SD's scaled-linear betas (1000 steps), one of the DDPM buffers a CompVis file holds."""
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=dtype) ** 2


def unet_err(pipe: Pipeline, ref, z_t=None, ctx=None, t: int = 981) -> float:
    """Max abs difference of our pipeline's UNet and a diffusers pipeline's on the same input (default: random,
    of the tiny SD shapes)."""
    z_t = torch.randn(2, 4, 8, 8) if z_t is None else z_t
    ctx = torch.randn(z_t.shape[0], 77, 32) if ctx is None else ctx
    with torch.no_grad():
        return (pipe.unet(z_t, t, ctx) - ref.unet(z_t, t, encoder_hidden_states=ctx).sample).abs().max().item()


def decode_err(pipe: Pipeline, ref, z) -> float:
    """Max abs difference of the two VAEs decoding `z` (diffusers' decoder takes the latent divided by 0.18215)."""
    with torch.no_grad():
        return (pipe.vae.decode(z) - ref.vae.decode(z / 0.18215).sample).abs().max().item()


def fixture_keys(name: str) -> dict:
    """A real checkpoint's key -> shape list (tests/fixtures/*.json, produced from the original files), no _meta."""
    keys = json.loads((FIXTURES / name).read_text())
    keys.pop("_meta")
    return keys


def meta(keys_shapes: dict) -> dict:
    """Tensors of those shapes on the meta device: a real layout to load, without its gigabytes."""
    return {k: torch.empty(s, device="meta") for k, s in keys_shapes.items()}


def load_single_file_on_meta(keys_shapes: dict, cfg: ModelConfig, text_encoder) -> dict:
    """A single file's layout split as the loader splits it and loaded into meta-device networks of `cfg`
    (`text_encoder`: the text tower's class); raises on any missing, unexpected or mis-shaped key. Returns the
    networks by part ("unet", "vae", "text")."""
    sds = split_single_file(meta(keys_shapes), cfg)
    with torch.device("meta"):
        modules = {"unet": ours_unet.UNet(cfg.unet), "vae": ours_vae.AutoencoderKL(cfg.vae),
                   "text": text_encoder(cfg.text)}
        for part, module in modules.items():
            load_module(module, sds[part], part)
    return modules


def tuned_for_inversion(cfg: ModelConfig, tokenizer, *, seed: int = 0, dtype=None, output_scale: float = 0.05):
    """Random weights of `cfg` tuned so that inversion tests measure something: unit-std latents (VAE scale 3.6),
    the UNet's output scaled by `output_scale` (a small eps, as a trained model's; 1 leaves it at PyTorch's init) and
    the cross-attention values x20 (text that matters for guidance)."""
    pipe = Pipeline.from_config(replace(cfg, vae=replace(cfg.vae, scaling_factor=3.6)), tokenizer, seed=seed, dtype=dtype)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(output_scale)
        for name, m in pipe.unet.named_modules():
            if name.endswith("attn2"):
                m.to_v.weight.mul_(20)
    return pipe
