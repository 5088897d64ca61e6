"""Whole-model configurations: named presets, their TOML mirrors in configs/models/, diffusers configs.

A `ModelConfig` bundles the configs of the UNet, the VAE, the text encoder and the DDIM schedule with
the family's sampling defaults. Presets live here as frozen dataclasses; `configs/models/<name>.toml`
holds the same values for people who read configs rather than code (a test keeps the two equal).
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .clip import CLIPTextConfig
from .ddim import DDIMConfig
from .unet import UNetConfig
from .vae import VAEConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "sd-v1" | "ldm"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    ddim: DDIMConfig = field(default_factory=DDIMConfig)
    guidance: float = 7.5  # classifier-free guidance scale w
    steps: int = 50
    image_size: int = 512  # pixels; the latent side is image_size / vae_scale
    # Prompt-to-Prompt defaults that depend on the network's resolutions (the authors' values for SD v1)
    blend_res: int = 16  # native side of the cross-attention maps local blending is made from
    self_max_keys: float = 16 ** 2  # self-attention is injected on layers with at most this many keys
    store_max_queries: float = 32 ** 2  # the attention store keeps layers with at most this many queries

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)


PRESETS: dict[str, ModelConfig] = {
    "sd-v1": ModelConfig("sd-v1"),
    # A miniature of SD v1 with the same topology (4 levels, attention at the first 3 and mid), for tests.
    "tiny": ModelConfig(
        "sd-v1",
        unet=UNetConfig(block_out_channels=(32, 64, 64, 64), heads=4, cross_attention_dim=32, sample_size=8),
        vae=VAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1),
        text=CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        image_size=64, blend_res=2,
    ),
}


def _build(cls, values: dict):
    """A dataclass from a dict, with lists turned into tuples and nested dataclasses built."""
    kwargs = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        sub = {"unet": UNetConfig, "vae": VAEConfig, "text": CLIPTextConfig, "ddim": DDIMConfig}.get(f.name)
        kwargs[f.name] = _build(sub, v) if cls is ModelConfig and sub else tuple(v) if isinstance(v, list) else v
    unknown = set(values) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
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

    d = asdict(cfg)
    lines = [f"{k} = {value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for section, sub in d.items():
        if isinstance(sub, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {value(v)}" for k, v in sub.items()]
    return "\n".join(lines) + "\n"


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


# --- diffusers config.json -> our configs ----------------------------------------------------------

def _require(d: dict, what: str, checks: dict):
    """Raise if a diffusers config asks for a feature we do not build (the SD 2 / SDXL / inpainting tells)."""
    bad = [f"{k}={d[k]!r} (we build {ok!r})" for k, ok in checks.items() if k in d and d[k] != ok
           and not (isinstance(ok, tuple) and d[k] in ok)]
    if bad:
        raise ValueError(f"{what} describes a model this project does not build: {'; '.join(bad)}. "
                         "Supported: Stable Diffusion v1.x and LDM text2img")


def unet_config_from_diffusers(d: dict) -> UNetConfig:
    _require(d, "unet/config.json", {
        "use_linear_projection": False, "transformer_layers_per_block": 1, "flip_sin_to_cos": True,
        "freq_shift": 0, "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None,
        "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "conv_in_kernel": 3,
        "conv_out_kernel": 3, "dual_cross_attention": False, "only_cross_attention": False, "act_fn": "silu",
        "mid_block_type": ("UNetMidBlock2DCrossAttn", None), "center_input_sample": False,
        "num_attention_heads": None, "encoder_hid_dim": None, "norm_eps": 1e-5, "prediction_type": "epsilon",
    })
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    attn = tuple(t == "CrossAttnDownBlock2D" for t in down)
    if set(down) - {"CrossAttnDownBlock2D", "DownBlock2D"} or \
            [t.replace("Up", "Down") for t in reversed(up)] != down:
        raise ValueError(f"unet/config.json: unsupported block types {down} / {up}")
    heads = d.get("attention_head_dim", 8)
    if isinstance(heads, list):
        if len(set(heads)) != 1:
            raise ValueError("unet/config.json: a different number of heads per level is not supported")
        heads = heads[0]
    return UNetConfig(in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
                      block_out_channels=tuple(d["block_out_channels"]), attention_levels=attn,
                      layers_per_block=d.get("layers_per_block", 2), heads=heads,
                      cross_attention_dim=d["cross_attention_dim"], norm_num_groups=d.get("norm_num_groups", 32),
                      sample_size=d.get("sample_size", 64))


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    _require(d, "vae/config.json", {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
                                    "mid_block_add_attention": True, "shift_factor": None})
    if set(d.get("down_block_types", ["DownEncoderBlock2D"])) != {"DownEncoderBlock2D"}:
        raise ValueError(f"vae/config.json: unsupported block types {d['down_block_types']}")
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                     block_out_channels=tuple(d["block_out_channels"]), layers_per_block=d.get("layers_per_block", 1),
                     latent_channels=d.get("latent_channels", 4), norm_num_groups=d.get("norm_num_groups", 32),
                     scaling_factor=d.get("scaling_factor") or 0.18215)


def clip_config_from_transformers(d: dict) -> CLIPTextConfig:
    if d.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        raise ValueError(f"text_encoder/config.json: model_type {d.get('model_type')!r} is not a CLIP text model")
    keys = {f.name for f in fields(CLIPTextConfig)}
    cfg = CLIPTextConfig(**{k: d[k] for k in keys if k in d})
    if cfg.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"text_encoder/config.json: hidden_act {cfg.hidden_act!r} is not supported")
    return cfg
