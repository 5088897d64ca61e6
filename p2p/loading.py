"""Find, identify and read a model on disk: a diffusers folder or a CompVis single file.

`read_model(path)` returns the model's `ModelConfig`, the state dicts of its three networks in our
names, and where its tokenizer is. It identifies what it is given and refuses, with a message that
says what the file is, checkpoints of other models (SD 2.x, SDXL, inpainting UNets).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from models.checkpoint import (CheckpointError, IGNORED_KEYS, read_json, read_tensors, split_prefix,
                               unet_from_compvis, vae_from_compvis, vae_from_diffusers)
from models.presets import (ModelConfig, clip_config_from_transformers, preset, unet_config_from_diffusers,
                            vae_config_from_diffusers)

UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
SD_V1_TELL = UNET + "output_blocks.11.0.skip_connection.weight"  # diffusers' own test for an SD v1 file
CROSS_K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
}


def read_model(path: str | Path, *, variant: str | None = None, ema: bool = True,
               config: str | ModelConfig | None = None):
    """-> (ModelConfig, {"unet": sd, "vae": sd, "text": sd}, tokenizer folder or None)."""
    path = Path(path)
    if path.is_dir():
        return read_folder(path, variant)
    if path.is_file():
        cfg = preset(config) if isinstance(config, str) else config or preset("sd-v1")
        return (cfg, *read_single_file(path, cfg, ema))
    raise FileNotFoundError(f"model not found: {path} (give a diffusers folder with unet/ vae/ text_encoder/ "
                            "tokenizer/, or a single .safetensors checkpoint; `p2p download` fetches both)")


# --- diffusers folders -----------------------------------------------------------------------------

def weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    """The weights of one component folder: the requested variant, else fp32 (else fp16); safetensors first."""
    order = [variant, None] if variant else [None, "fp16"]
    candidates = [folder / f"{stem}{'.' + v if v else ''}.{ext}" for ext in ("safetensors", "bin") for v in order]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(c.name for c in candidates)}")


def read_folder(path: Path, variant: str | None):
    if (path / "bert").is_dir() or (path / "vqvae").is_dir():
        raise CheckpointError(f"{path} is an LDM text2img folder (bert/, vqvae/); only Stable Diffusion v1 "
                              "folders are supported so far")
    missing = [d for d in ("unet", "vae", "text_encoder") if not (path / d).is_dir()]
    if missing:
        raise CheckpointError(f"{path} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/ "
                              "(expected unet/, vae/, text_encoder/, tokenizer/)")
    try:
        cfg = ModelConfig(
            "sd-v1",
            unet=unet_config_from_diffusers(read_json(path / "unet" / "config.json")),
            vae=vae_config_from_diffusers(read_json(path / "vae" / "config.json")),
            text=clip_config_from_transformers(read_json(path / "text_encoder" / "config.json")),
        )
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: a config.json lacks a required field ({e})") from e
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        cfg = replace(cfg, ddim=cfg.ddim.updated(read_json(sched)))
    n = cfg.unet.sample_size  # the authors' SD v1 choices (64x64 latent) relative to the native latent size
    cfg = replace(cfg, image_size=n * cfg.vae_scale, blend_res=max(n // 4, 1), self_max_keys=max(n // 4, 1) ** 2,
                  store_max_queries=max(n // 2, 1) ** 2)
    if cfg.unet.cross_attention_dim != cfg.text.hidden_size:
        raise CheckpointError(f"{path}: the UNet cross-attends to width {cfg.unet.cross_attention_dim} but the text "
                              f"encoder is {cfg.text.hidden_size} wide (SD v1 is 768 and 768)")
    sds = {name: read_tensors(weights_file(path / name, WEIGHT_NAMES[name], variant)) for name in WEIGHT_NAMES}
    text = sds.pop("text_encoder")
    sds["text"] = split_prefix(text, "text_model.") or text  # transformers >= 5.6 saves without the prefix
    sds["vae"] = vae_from_diffusers(sds["vae"])
    tok = path / "tokenizer"
    return cfg, sds, tok if tok.is_dir() else None


# --- CompVis single files --------------------------------------------------------------------------

def identify(sd: dict, path: Path) -> None:
    """Raise a CheckpointError that names the model, for anything that is not an SD v1 single file."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError(f"{path} is an SDXL checkpoint; this project runs Stable Diffusion v1.x (and LDM)")
    if CROSS_K in sd and sd[CROSS_K].shape[-1] == 1024:
        raise CheckpointError(f"{path} is a Stable Diffusion 2.x checkpoint (1024-wide OpenCLIP text states), "
                              "not an SD v1 checkpoint; use SD 1.4 / 1.5 weights (`p2p download sd-v1-5`)")
    if CROSS_K in sd and sd[CROSS_K].shape[-1] == 1280:
        raise CheckpointError(f"{path} is an LDM text2img checkpoint; only SD v1 single files are supported so far")
    conv_in = sd.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise CheckpointError(f"{path} has a UNet with {conv_in.shape[1]} input channels (an inpainting or "
                              "depth model); Prompt-to-Prompt needs a plain 4-channel text-to-image SD v1 UNet")
    if SD_V1_TELL not in sd:
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in sd):
            raise CheckpointError(f"{path} is a single diffusers UNet file; pass the whole diffusers folder "
                                  "(with unet/, vae/, text_encoder/, tokenizer/) instead")
        raise CheckpointError(f"{path} is not a Stable Diffusion v1 checkpoint: it has no {SD_V1_TELL} "
                              f"(its first keys: {', '.join(sorted(sd)[:5])})")


def read_single_file(path: Path, cfg: ModelConfig, ema: bool):
    return split_single_file(read_tensors(path), cfg, ema, path), None


def split_single_file(sd: dict, cfg: ModelConfig, ema: bool = True, path: Path | str = "checkpoint") -> dict:
    """A CompVis single file's tensors -> {"unet", "vae", "text"} in our names; every key accounted for."""
    identify(sd, path)
    unet = split_prefix(sd, UNET)
    ema_keys = {k for k in sd if k.startswith("model_ema.")} - IGNORED_KEYS
    if ema and len(ema_keys) > 100:  # a full-EMA file: the EMA copy is the one to sample with
        ema_unet = {k: sd.get("model_ema.diffusion_model" + k.replace(".", "")) for k in unet}
        if None in ema_unet.values():
            raise CheckpointError(f"{path}: the EMA weights do not cover the UNet; load with ema=False")
        unet = ema_unet
    text = split_prefix(sd, CLIP)
    sds = {"unet": unet_from_compvis(unet, cfg.unet),
           "vae": vae_from_compvis(split_prefix(sd, VAE), len(cfg.vae.block_out_channels)),
           "text": split_prefix(text, "text_model.") or text}
    leftover = {k for k in sd if not k.startswith((UNET, VAE, CLIP)) and k not in IGNORED_KEYS} - ema_keys
    if leftover:
        raise CheckpointError(f"{path} holds {len(leftover)} entries that belong to no SD v1 network: "
                              f"{', '.join(sorted(leftover)[:8])}")
    return sds
