"""Model families as data: what Stable Diffusion v1, Stable Diffusion 2.x and LDM text2img-large-256 do differently.

Prompt-to-Prompt (Hertz et al., ICLR 2023) shows its results on both. They share the UNet
(models/unet.py, cross-attention sites at 64/32/16/8 for SD, at 32/16/8/4 for LDM), the KL-f8 VAE
(models/vae.py) and DDIM (models/ddim.py); they differ in the text encoder and its tokenizer, in how
their files are laid out, and in the defaults the authors used with each. Stable Diffusion 2.x (after the
paper) is SD v1's code with other configs (models/presets.py), OpenCLIP's padding id and OpenCLIP's key layout
in single files; SDXL adds two text towers and the micro-conditioning (models/sdxl.py) and sgm's single-file
layout. Code that handles a model looks its `ModelConfig.family` up in `FAMILIES` instead of
branching on the name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .checkpoint import clip_from_open_clip, ldmbert_from_compvis, sdxl_text_from_sgm, split_prefix
from .clip import CLIPTextModel
from .ddim import DIFFUSERS_DEFAULTS, DDIMConfig
from .errors import UserError
from .ldmbert import LDMBertModel
from .presets import PRESETS, clip_config_from_transformers, ldmbert_config_from_diffusers, \
    sdxl_text_config_from_transformers
from .sdxl import SDXLTextEncoder, SDXLTokenizer
from .tokenizer import CLIPTokenizer, OpenCLIPTokenizer, PromptTokenizer
from .wordpiece import BertTokenizer


@dataclass(frozen=True)
class Family:
    name: str
    title: str  # for messages
    preset: str  # the full-size preset in models/presets.py
    pipeline_class: str  # diffusers model_index.json `_class_name`
    text_encoder: type  # module class of psi: CLIPTextModel | LDMBertModel
    tokenizer: type[PromptTokenizer]
    tokenizer_forms: str  # what a tokenizer path may be, for messages
    folders: dict[str, str]  # our part ("unet", "vae", "text", SDXL's "text_2") -> its diffusers sub-folder
    text_file_prefix: str  # prefix of the text weights in a diffusers file ("text_model." as transformers 4 saved)
    text_config_from_json: Callable[..., Any]  # the text sub-folders' config.json (one per text part) -> our config
    text_from_compvis: Callable[[dict, Any], dict]  # the single file's text weights (prefix stripped) -> our names
    scheduler_defaults: DDIMConfig  # what the keys a scheduler_config.json lacks mean for this family
    runtime_pickles: bool  # whether generation reads PyTorch pickles (weights_only=True) or wants safetensors
    text_file_key: str = "cond_stage_model.transformer."  # prefix of the text weights in a CompVis single file
    linear_projection: bool = False  # the UNet's proj_in/out are Linear: tells SD 2.x from SD v1 (same pipeline class)
    presets: tuple[str, ...] = ()  # the full-size presets of the family when there are several (by file name)
    zero_negative: bool = False  # an empty negative prompt is zeros, text states and pooled (SDXL's
    # force_zeros_for_empty_prompt, as diffusers and sgm's demo do), not the encoding of ""


FAMILIES: dict[str, Family] = {
    "sd-v1": Family(
        "sd-v1", title="Stable Diffusion v1", preset="sd-v1", pipeline_class="StableDiffusionPipeline", text_encoder=CLIPTextModel,
        tokenizer=CLIPTokenizer, tokenizer_forms="a diffusers tokenizer/ folder, a tokenizer.json, or OpenAI's "
        "bpe_simple_vocab_16e6.txt.gz",
        folders={"unet": "unet", "vae": "vae", "text": "text_encoder"}, text_file_prefix="text_model.",
        text_config_from_json=clip_config_from_transformers,
        text_from_compvis=lambda sd, cfg: split_prefix(sd, "text_model.") or sd,
        # StableDiffusionPipeline forces steps_offset 1 and clip_sample False on whatever the file says
        scheduler_defaults=PRESETS["sd-v1"].ddim,
        runtime_pickles=True,  # sd-v1-4.ckpt keeps loading as it always did: weights_only=True runs no code
    ),
    "sd-v2": Family(
        "sd-v2", title="Stable Diffusion 2.x", preset="sd2", pipeline_class="StableDiffusionPipeline",
        text_encoder=CLIPTextModel, tokenizer=OpenCLIPTokenizer, tokenizer_forms="a diffusers tokenizer/ folder, a "
        "tokenizer.json, or OpenAI's bpe_simple_vocab_16e6.txt.gz (the same BPE as SD v1; SD 2 pads with '!' = 0)",
        folders={"unet": "unet", "vae": "vae", "text": "text_encoder"}, text_file_prefix="text_model.",
        text_config_from_json=clip_config_from_transformers,
        # open_clip's 24-block text tower; SD 2 uses the first 23 and the final LayerNorm
        text_from_compvis=lambda sd, cfg: clip_from_open_clip(sd, cfg.num_hidden_layers),
        # a scheduler_config.json without prediction_type means eps (diffusers' default): 2.x-base
        scheduler_defaults=PRESETS["sd2-base"].ddim,
        runtime_pickles=True,  # the .ckpt files are plain tensors: weights_only=True reads them, running no code
        text_file_key="cond_stage_model.model.", linear_projection=True, presets=("sd2-base", "sd2"),
    ),
    "sdxl": Family(
        "sdxl", title="Stable Diffusion XL", preset="sdxl", pipeline_class="StableDiffusionXLPipeline",
        text_encoder=SDXLTextEncoder, tokenizer=SDXLTokenizer, tokenizer_forms="a diffusers tokenizer/ folder, a "
        "tokenizer.json, or OpenAI's bpe_simple_vocab_16e6.txt.gz (both SDXL tokenizers are CLIP's BPE)",
        folders={"unet": "unet", "vae": "vae", "text": "text_encoder", "text_2": "text_encoder_2"},
        text_file_prefix="text_model.", text_config_from_json=sdxl_text_config_from_transformers,
        text_from_compvis=sdxl_text_from_sgm,  # conditioner.embedders.{0: transformers CLIP-L, 1: open_clip bigG}
        scheduler_defaults=PRESETS["sdxl"].ddim, runtime_pickles=False,
        text_file_key="conditioner.embedders.", linear_projection=True, zero_negative=True,
    ),
    "ldm": Family(
        "ldm", title="LDM text2img", preset="ldm", pipeline_class="LDMTextToImagePipeline", text_encoder=LDMBertModel,
        tokenizer=BertTokenizer, tokenizer_forms="a BERT uncased vocab.txt (or its tokenizer/ folder), or a "
        "tokenizer.json",
        folders={"unet": "unet", "vae": "vqvae", "text": "bert"}, text_file_prefix="",
        text_config_from_json=ldmbert_config_from_diffusers,
        text_from_compvis=lambda sd, cfg: ldmbert_from_compvis(sd, cfg.encoder_layers),
        # LDMTextToImagePipeline takes the file as DDIMScheduler reads it: a missing key is diffusers' default
        scheduler_defaults=DIFFUSERS_DEFAULTS,
        runtime_pickles=False,  # the public files are 6 GB of pickles: `p2p convert` them once to safetensors
    ),
}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
