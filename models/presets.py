"""Whole-model configurations: named presets, their TOML mirrors in configs/models/, diffusers configs.

A `ModelConfig` bundles the configs of the UNet, the VAE, the text encoder and the DDIM schedule with
the family's sampling defaults. The paper's two models are the two families: "sd-v1" (Stable Diffusion
v1, CLIP text encoder, 64x64 latents) and "ldm" (LDM text2img-large-256, LDMBert, 32x32 latents); they
share the UNet and VAE code and differ in the text encoder (`TEXT_CONFIGS`). Presets live here as frozen dataclasses; `configs/models/<name>.toml`
holds the same values for people who read configs rather than code (a test keeps the two equal).
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .clip import CLIPTextConfig
from .ddim import DDIMConfig
from .errors import UnknownNameError, UserError
from .ldmbert import LDMBertConfig
from .sdxl import SDXLTextConfig
from .unet import UNetConfig
from .vae import VAEConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
TEXT_CONFIGS = {"sd-v1": CLIPTextConfig, "sd-v2": CLIPTextConfig, "ldm": LDMBertConfig,  # family -> its text config
                "sdxl": SDXLTextConfig}


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "sd-v1" | "sd-v2" | "ldm" | "sdxl"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig | LDMBertConfig | SDXLTextConfig = field(default_factory=CLIPTextConfig)  # by family
    ddim: DDIMConfig = field(default_factory=DDIMConfig)
    guidance: float = 7.5  # classifier-free guidance scale w
    steps: int = 50
    image_size: int = 512  # pixels; the latent side is image_size / vae_scale

    def __post_init__(self):
        if self.family not in TEXT_CONFIGS:
            raise UserError(f"unknown model family {self.family!r}; known: {', '.join(TEXT_CONFIGS)}")
        if not isinstance(self.text, TEXT_CONFIGS[self.family]):
            raise UserError(f"a {self.family!r} model's text encoder is configured by a "
                            f"{TEXT_CONFIGS[self.family].__name__}, got a {type(self.text).__name__}")

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)


# Stable Diffusion 2.x (Stability-AI/stablediffusion, v2-inference.yaml and v2-inference-v.yaml; the diffusers
# configs of stable-diffusion-2-1(-base)): the SD v1 UNet with 64-wide heads (5/10/20/20 per level), linear
# proj_in/proj_out and 1024-wide context; OpenCLIP ViT-H/14's text tower (GELU, 16 heads) cut after its 23rd
# of 24 blocks, then its final LayerNorm ("penultimate" layer): diffusers stores it as a 23-layer CLIPTextModel.
SD2_TEXT = CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                          hidden_act="gelu")
SD2_UNET = UNetConfig(heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
SDXL_UNET = UNetConfig(block_out_channels=(320, 640, 1280), attention_levels=(False, True, True), heads=(5, 10, 20),
                       transformer_layers=(1, 2, 10), cross_attention_dim=2048, sample_size=128,
                       use_linear_projection=True, addition_time_embed_dim=256,
                       projection_class_embeddings_input_dim=2816)

PRESETS: dict[str, ModelConfig] = {
    "sd-v1": ModelConfig("sd-v1"),
    # SD 2.0/2.1-base: 512 px, predicts eps.
    "sd2-base": ModelConfig("sd-v2", unet=SD2_UNET, text=SD2_TEXT),
    # SD 2.0/2.1 (768-v): 768 px (96x96 latents), predicts v; 2.1 needs the fp32 attention upcast in fp16
    # (diffusers sets upcast_attention for 2.1 only; it costs 2.0 nothing but time).
    "sd2": ModelConfig("sd-v2", unet=replace(SD2_UNET, sample_size=96, upcast_attention=True), text=SD2_TEXT,
                       ddim=DDIMConfig(prediction_type="v_prediction"), image_size=768),
    # A miniature of SD v1 with the same topology (4 levels, attention at the first 3 and mid), for tests.
    "tiny": ModelConfig(
        "sd-v1",
        unet=UNetConfig(block_out_channels=(32, 64, 64, 64), heads=4, cross_attention_dim=32, sample_size=8),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        image_size=64,
    ),
    # The embedded default model (p2p/embedded, trained by p2p/world/train.py on p2p/world/scenes.py): SD v1's code paths
    # at a toy size. 64 px images, a KL-f4 autoencoder with 8 latent channels (16x16x8 latents: SD's 4 lose a small
    # thing's colour and pattern), a UNet with attention at 16x16 and 8x8 and in the mid block at 4x4 (7 transformer
    # blocks, as SD's 16 at 64/32/16/8), a 3-layer CLIP-style text encoder over the caption vocabulary's BPE (586
    # tokens). The VAE scaling factor is 1 / std of the training latents. Trained with v-prediction on SD v1's betas
    # rescaled to zero terminal SNR, sampled with trailing DDIM timesteps (Lin et al. 2024); guidance 2 read the
    # prompts back best (p2p/embedded/train.json). P2P defaults at its resolutions: blend from the 8x8 maps,
    # self-injection where keys <= 8**2.
    "embedded": ModelConfig(
        "sd-v1",
        unet=UNetConfig(in_channels=8, out_channels=8, block_out_channels=(48, 96, 96),
                        attention_levels=(True, True, False), layers_per_block=1, heads=4, cross_attention_dim=128,
                        norm_num_groups=16, sample_size=16),
        vae=VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8,
                      scaling_factor=1.62811),
        text=CLIPTextConfig(vocab_size=586, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                            num_attention_heads=4),
        ddim=DDIMConfig(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        steps_offset=0, set_alpha_to_one=True),
        guidance=2.0, steps=50, image_size=64,
    ),
    # LDM text2img-large-256: the SD v1 UNet cross-attending to 1280-wide LDMBert states, at 32x32 latents
    # (attention at 32, 16, 8 and the mid block at 4). The authors' LDM notebook: guidance 5, the store
    # keeps maps with <= 16**2 queries, local blend from the 16x16 maps (down_cross[:2] + up_cross[3:6]),
    # self-attention injected where keys <= 16**2. DDIM as diffusers samples the hub model (its
    # scheduler_config.json predates steps_offset/set_alpha_to_one: 0 and true), timesteps 980, ..., 0.
    "ldm": ModelConfig(
        "ldm", unet=UNetConfig(cross_attention_dim=1280, sample_size=32), text=LDMBertConfig(),
        ddim=DDIMConfig(steps_offset=0, set_alpha_to_one=True), guidance=5.0, image_size=256,
    ),
    # A miniature of SD 2.x (per-level heads, linear projections, upcast, GELU text encoder), for tests.
    "tiny-sd2": ModelConfig(
        "sd-v2",
        unet=UNetConfig(block_out_channels=(32, 64, 64, 64), heads=(2, 4, 4, 4), cross_attention_dim=32,
                        sample_size=8, use_linear_projection=True, upcast_attention=True),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            hidden_act="gelu"),
        image_size=64,
    ),
    # SDXL base 1.0 (Stability-AI/generative-models sd_xl_base.yaml; the diffusers configs of
    # stable-diffusion-xl-base-1.0, sd2-sdxl.md §3): 3 levels, attention at the lower two only with 2 and 10
    # transformer blocks per spatial transformer (mid block 10), 64-wide heads, 2048-wide context (CLIP-L || bigG),
    # the "text_time" micro-conditioning (pooled 1280 + 6 x 256), the retrained VAE's scaling factor 0.13025,
    # 1024 px, guidance 5 (diffusers' and sgm's default).
    "sdxl": ModelConfig("sdxl", unet=SDXL_UNET, vae=VAEConfig(scaling_factor=0.13025), text=SDXLTextConfig(),
                        guidance=5.0, image_size=1024),
    # A miniature of SDXL (3 levels, no attention at the top one, 1/2/3 transformer blocks, micro-conditioning of
    # width 8, towers of width 32 (quick-GELU) and 48 (GELU, projection 16)), for tests.
    "tiny-sdxl": ModelConfig(
        "sdxl",
        unet=UNetConfig(block_out_channels=(32, 64, 64), attention_levels=(False, True, True), heads=(2, 4, 4),
                        transformer_layers=(1, 2, 3), cross_attention_dim=80, sample_size=8,
                        use_linear_projection=True, addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=16 + 6 * 8),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1, scaling_factor=0.13025),
        text=SDXLTextConfig(
            clip=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                layer="penultimate"),
            open_clip=CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                     hidden_act="gelu", layer="penultimate", projection_dim=16)),
        guidance=5.0, image_size=64,
    ),
    # A miniature of LDM (same topology; LDMBert with an inner attention width unlike its width), for tests.
    "tiny-ldm": ModelConfig(
        "ldm",
        unet=UNetConfig(block_out_channels=(32, 64, 64, 64), heads=4, cross_attention_dim=32, sample_size=8),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        text=LDMBertConfig(d_model=32, encoder_layers=2, encoder_ffn_dim=64, encoder_attention_heads=2, head_dim=8),
        ddim=DDIMConfig(steps_offset=0, set_alpha_to_one=True), guidance=5.0, image_size=64,
    ),
}


def _build(cls, values: dict):
    """A dataclass from a dict, with lists turned into tuples and nested dataclasses built."""
    kwargs = {}
    text = TEXT_CONFIGS.get(values.get("family"), CLIPTextConfig)
    for f in fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        sub = {"unet": UNetConfig, "vae": VAEConfig, "text": text, "ddim": DDIMConfig}.get(f.name)
        if cls is SDXLTextConfig:  # its two towers
            sub = CLIPTextConfig
        kwargs[f.name] = _build(sub, v) if cls in (ModelConfig, SDXLTextConfig) and sub else \
            tuple(v) if isinstance(v, list) else v
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise UserError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    return cls(**kwargs)


def load_toml(path: str | Path) -> ModelConfig:
    with open(path, "rb") as f:
        return _build(ModelConfig, tomllib.load(f))


def to_toml(cfg: ModelConfig) -> str:
    """The TOML text of a config (the format of configs/models/*.toml)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (tuple, list)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v) if isinstance(v, float) else f'"{v}"' if isinstance(v, str) else str(v)

    def table(d: dict, name: str) -> list[str]:
        lines = [f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict)]
        lines = ([f"[{name}]"] if name and lines else []) + lines
        for section, sub in d.items():
            if isinstance(sub, dict):  # sections, and SDXL's [text.clip] / [text.open_clip]
                lines += ([""] if lines else []) + table(sub, f"{name}.{section}" if name else section)
        return lines

    return "\n".join(table(asdict(cfg), "")) + "\n"


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise UnknownNameError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- diffusers config.json -> our configs ----------------------------------------------------------

def _require(d: dict, what: str, checks: dict):
    """Raise if a diffusers config asks for a feature we do not build (the SD 2 / SDXL / inpainting tells)."""
    bad = [f"{k}={d[k]!r} (we build {ok!r})" for k, ok in checks.items() if k in d and d[k] != ok
           and not (isinstance(ok, tuple) and d[k] in ok)]
    if bad:
        raise UserError(f"{what} describes a model this project does not build: {'; '.join(bad)}. "
                        "Supported: Stable Diffusion v1.x, 2.x and XL, and LDM text2img")


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    _require(d, "unet/config.json", {
        "use_linear_projection": (False, True), "flip_sin_to_cos": True,
        "freq_shift": 0, "class_embed_type": None, "addition_embed_type": (None, "text_time"), "num_class_embeds": None,
        "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
        "conv_out_kernel": 3, "dual_cross_attention": False, "only_cross_attention": False, "act_fn": "silu",
        "mid_block_type": ("UNetMidBlock2DCrossAttn", None), "center_input_sample": False,
        "num_attention_heads": None, "encoder_hid_dim": None, "norm_eps": 1e-5, "prediction_type": "epsilon",
    })
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    attn = tuple(t == "CrossAttnDownBlock2D" for t in down)
    if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or \
            [t.replace("Up", "Down") for t in reversed(up)] != down:
        raise UserError(f"unet/config.json: unsupported block types {down} / {up}")
    heads = d.get("attention_head_dim", 8)
    if isinstance(heads, list):  # one entry per level (SD 2.x: 5, 10, 20, 20); one number if all are equal
        if len(heads) != len(down):
            raise UserError(f"unet/config.json: attention_head_dim {heads} needs one entry per level ({len(down)})")
        heads = heads[0] if len(set(heads)) == 1 else tuple(heads)
    depth = d.get("transformer_layers_per_block", 1)  # SDXL: [1, 2, 10]
    if isinstance(depth, list):
        if len(depth) != len(down) or not all(isinstance(x, int) for x in depth):
            raise UserError(f"unet/config.json: transformer_layers_per_block {depth} needs one number per level")
        depth = depth[0] if len(set(depth)) == 1 else tuple(depth)
    text_time = d.get("addition_embed_type") == "text_time"  # SDXL's micro-conditioning
    return UNetConfig(in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
                      block_out_channels=tuple(d["block_out_channels"]), attention_levels=attn,
                      layers_per_block=d.get("layers_per_block", 2), heads=heads,
                      cross_attention_dim=d["cross_attention_dim"], norm_num_groups=d.get("norm_num_groups", 32),
                      sample_size=d.get("sample_size", 64),
                      use_linear_projection=bool(d.get("use_linear_projection", False)),
                      upcast_attention=bool(d.get("upcast_attention", False)), transformer_layers=depth,
                      addition_time_embed_dim=d["addition_time_embed_dim"] if text_time else 0,
                      projection_class_embeddings_input_dim=d["projection_class_embeddings_input_dim"] if text_time
                      else 0)


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    _require(d, "vae/config.json", {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                                    "mid_block_add_attention": True, "shift_factor": None})
    if set(d.get("down_block_types", ["DownEncoderBlock2D"])) != {"DownEncoderBlock2D"}:
        raise UserError(f"vae/config.json: unsupported block types {d['down_block_types']}")
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                     block_out_channels=tuple(d["block_out_channels"]), layers_per_block=d.get("layers_per_block", 1),
                     latent_channels=d.get("latent_channels", 4), norm_num_groups=d.get("norm_num_groups", 32),
                     scaling_factor=d.get("scaling_factor") or 0.18215)


def clip_config_from_transformers(d: dict) -> CLIPTextConfig:
    if d.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise UserError(f"text_encoder/config.json: model_type {d.get('model_type')!r} is not a CLIP text model")
    # `projection_dim` of a CLIPTextModel config is a placeholder (SD v1 says 768, SD 2 512): the projection and the
    # layer used are the family's choice, not the file's
    keys = {f.name for f in fields(CLIPTextConfig)} - {"layer", "projection_dim"}
    cfg = CLIPTextConfig(**{k: d[k] for k in keys if k in d})
    if cfg.hidden_act not in ("quick_gelu", "gelu"):
        raise UserError(f"text_encoder/config.json: hidden_act {cfg.hidden_act!r} is not supported")
    return cfg


def sdxl_text_config_from_transformers(d: dict, d2: dict) -> SDXLTextConfig:
    """text_encoder/config.json (CLIP ViT-L) and text_encoder_2/config.json (bigG, CLIPTextModelWithProjection)."""
    clip, open_clip = clip_config_from_transformers(d), clip_config_from_transformers(d2)
    if not d2.get("projection_dim"):
        raise UserError("text_encoder_2/config.json has no projection_dim: SDXL's second tower has a projection")
    return SDXLTextConfig(clip=replace(clip, layer="penultimate"),
                          open_clip=replace(open_clip, layer="penultimate", projection_dim=d2["projection_dim"]))


def ldmbert_config_from_diffusers(d: dict) -> LDMBertConfig:
    """bert/config.json of a diffusers LDM folder (diffusers' LDMBertConfig) -> our LDMBertConfig."""
    if d.get("model_type", "ldmbert") != "ldmbert":
        raise UserError(f"bert/config.json: model_type {d.get('model_type')!r} is not LDMBert")
    _require(d, "bert/config.json", {"activation_function": "gelu", "scale_embedding": False})
    keys = {f.name for f in fields(LDMBertConfig)}
    return LDMBertConfig(**{k: d[k] for k in keys if k in d})


# --- our configs -> diffusers / transformers config.json (written by `p2p convert`) ---------------------

def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    heads = cfg.heads if isinstance(cfg.heads, int) else list(cfg.heads)
    depth = cfg.transformer_layers if isinstance(cfg.transformer_layers, int) else list(cfg.transformer_layers)
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": heads,
            "block_out_channels": list(cfg.block_out_channels), "center_input_sample": False,
            "cross_attention_dim": cfg.cross_attention_dim, "down_block_types": down, "downsample_padding": 1,
            "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": cfg.in_channels,
            "layers_per_block": cfg.layers_per_block, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
            "norm_num_groups": cfg.norm_num_groups, "out_channels": cfg.out_channels, "sample_size": cfg.sample_size,
            "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
            "use_linear_projection": cfg.use_linear_projection, "upcast_attention": cfg.upcast_attention,
            "transformer_layers_per_block": depth,
            **({"addition_embed_type": "text_time", "addition_time_embed_dim": cfg.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim}
               if cfg.addition_time_embed_dim else {})}


def vae_config_to_diffusers(cfg: VAEConfig, image_size: int) -> dict:
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(cfg.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "in_channels": cfg.in_channels,
            "latent_channels": cfg.latent_channels, "layers_per_block": cfg.layers_per_block,
            "norm_num_groups": cfg.norm_num_groups, "out_channels": cfg.out_channels, "sample_size": image_size,
            "scaling_factor": cfg.scaling_factor, "up_block_types": ["UpDecoderBlock2D"] * n}


def text_config_to_json(cfg: CLIPTextConfig | LDMBertConfig) -> dict:
    """text_encoder/config.json (transformers' CLIPTextConfig) or bert/config.json (diffusers' LDMBertConfig)."""
    if isinstance(cfg, LDMBertConfig):
        return {"architectures": ["LDMBertModel"], "model_type": "ldmbert", "pad_token_id": 0, "scale_embedding": False,
                **asdict(cfg)}
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": 49407, **asdict(cfg)}


def sdxl_text_configs_to_json(cfg: SDXLTextConfig) -> tuple[dict, dict]:
    """text_encoder/config.json (CLIP ViT-L, a CLIPTextModel) and text_encoder_2/config.json (bigG, a
    CLIPTextModelWithProjection with its projection_dim) of an SDXL folder; the layer read is the family's, not
    written (sdxl_text_config_from_transformers reads it back)."""
    first, second = ({k: v for k, v in text_config_to_json(c).items() if k not in ("layer", "projection_dim")}
                     for c in (cfg.clip, cfg.open_clip))
    second.update(architectures=["CLIPTextModelWithProjection"], projection_dim=cfg.open_clip.projection_dim,
                  pad_token_id=0)  # bigG pads with "!" = 0
    return first, second
