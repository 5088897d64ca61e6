"""Reading public checkpoints into our modules: file formats, key layouts, and strict checks.

Our module names are the diffusers names, so a diffusers folder (`unet/`, `vae/`, `text_encoder/`;
LDM: `unet/`, `vqvae/`, `bert/`) loads by name. The CompVis single files (`v1-5-pruned-emaonly.safetensors`,
`sd-v1-4.ckpt`, LDM's `text2img-large/model.ckpt`) use the original names; they are renamed by prefix
pairs (enumerated from the config, because block indices are arithmetic) followed by the sub-key
tables below. Every key of a file is consumed or on a named
ignore list, every shape is checked, and a mismatch raises one `CheckpointError` naming the missing,
unexpected and mis-shaped keys. Pickles are read with `torch.load(weights_only=True)`: no code runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import UserError
from .unet import UNetConfig


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""


# --- reading files ---------------------------------------------------------------------------------

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


def aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` in PyTorch's own (64-byte aligned) memory. safetensors hands tensors out at unaligned addresses, and some
    CPU kernels round differently there (a 1x1 conv on a 1x1 map, a matrix-vector product). Copied as each is read,
    weights from a file compute exactly as the same weights in a module built in memory (diffusers')."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a pickle loaded with weights_only=True (no code is run)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: aligned(f.get_tensor(k)) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                "download it again (`p2p download` verifies the sha256)") from e
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        except Exception as e:  # weights_only refuses code objects; zip errors mean a truncated file
            raise CheckpointError(
                f"{path} could not be read as a PyTorch weights file with weights_only=True ({e.__class__.__name__}: "
                f"{str(e).splitlines()[0][:200]}). It is truncated, corrupt, or holds code that we refuse to unpickle; "
                "use a .safetensors file instead") from e
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # Lightning checkpoint
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; expected .safetensors "
                          f"(or a PyTorch pickle: {', '.join(PICKLE_SUFFIXES)})")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file may be truncated") from e


# --- key tables ------------------------------------------------------------------------------------

UNET_RESNET_RENAMES = {  # CompVis ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
VAE_RENAMES = {  # CompVis first_stage_model -> diffusers AutoencoderKL (inside resnets / mid attention)
    "nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
    "proj_out": "to_out.0",
}
VAE_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
UNET_FIXED = {
    "time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
    "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out.",
    "middle_block.0.": "mid_block.resnets.0.", "middle_block.1.": "mid_block.attentions.0.",
    "middle_block.2.": "mid_block.resnets.1.",
    "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",  # SDXL (sgm)
}
VAE_FIXED = {
    "encoder.norm_out.": "encoder.conv_norm_out.", "decoder.norm_out.": "decoder.conv_norm_out.",
    "encoder.mid.block_1.": "encoder.mid_block.resnets.0.", "encoder.mid.block_2.": "encoder.mid_block.resnets.1.",
    "decoder.mid.block_1.": "decoder.mid_block.resnets.0.", "decoder.mid.block_2.": "decoder.mid_block.resnets.1.",
    "encoder.mid.attn_1.": "encoder.mid_block.attentions.0.", "decoder.mid.attn_1.": "decoder.mid_block.attentions.0.",
}
# File-level entries that are not network weights (CompVis DDPM schedule buffers, EMA bookkeeping, CLIP ids).
IGNORED_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "model_ema.decay", "model_ema.num_updates", "denoiser.sigmas",  # sgm: its DiscreteDenoiser's buffer
}
IGNORED_SUFFIXES = ("embeddings.position_ids",)


def unet_prefixes(cfg: UNetConfig) -> dict[str, str]:
    """CompVis `input_blocks/middle_block/output_blocks` prefixes -> our `down_blocks/mid_block/up_blocks`.

    CompVis numbers every resnet, transformer and resampler of the down path in one sequence
    (`input_blocks.i.k`), L = layers_per_block per level plus one downsampler, and the up path likewise
    with L + 1 per level.
    """
    L, n = cfg.layers_per_block, len(cfg.block_out_channels)
    pairs, i = dict(UNET_FIXED), 1
    for b in range(n):
        for l in range(L):
            pairs[f"input_blocks.{i}.0."] = f"down_blocks.{b}.resnets.{l}."
            pairs[f"input_blocks.{i}.1."] = f"down_blocks.{b}.attentions.{l}."
            i += 1
        if b < n - 1:
            pairs[f"input_blocks.{i}.0.op."] = f"down_blocks.{b}.downsamplers.0.conv."
            i += 1
    i = 0
    for u in range(n):
        for l in range(L + 1):
            pairs[f"output_blocks.{i}.0."] = f"up_blocks.{u}.resnets.{l}."
            if cfg.attention_levels[n - 1 - u]:
                pairs[f"output_blocks.{i}.1."] = f"up_blocks.{u}.attentions.{l}."
            i += 1
        if u < n - 1:  # the upsampler follows the last resnet (and its transformer, if any)
            k = 2 if cfg.attention_levels[n - 1 - u] else 1
            pairs[f"output_blocks.{i - 1}.{k}.conv."] = f"up_blocks.{u}.upsamplers.0.conv."
    return pairs


# LDM's text encoder: x-transformers `TransformerWrapper` (CompVis names, `cond_stage_model.transformer.`
# stripped) -> diffusers LDMBert. Layer pairs alternate attention ('a') and feed-forward ('f'): x-transformers
# layer 2i is the attention of LDMBert layer i, layer 2i + 1 its feed-forward.
LDMBERT_FIXED = {"token_emb.": "model.embed_tokens.", "pos_emb.emb.": "model.embed_positions.",
                 "norm.": "model.layer_norm.", "to_logits.": "to_logits."}
LDMBERT_LAYER = {  # (0 attention | 1 feed-forward, x-transformers sub-module) -> LDMBert sub-module of layer i
    (0, "0"): "self_attn_layer_norm", (0, "1.to_q"): "self_attn.q_proj", (0, "1.to_k"): "self_attn.k_proj",
    (0, "1.to_v"): "self_attn.v_proj", (0, "1.to_out"): "self_attn.out_proj",
    (1, "0"): "final_layer_norm", (1, "1.net.0.0"): "fc1", (1, "1.net.2"): "fc2",
}


def ldmbert_prefixes(layers: int) -> dict[str, str]:
    pairs = dict(LDMBERT_FIXED)
    for i in range(layers):
        for (half, old), new in LDMBERT_LAYER.items():
            pairs[f"attn_layers.layers.{2 * i + half}.{old}."] = f"model.layers.{i}.{new}."
    return pairs


def ldmbert_from_compvis(sd: dict, layers: int) -> dict:
    """LDM text-encoder weights with `cond_stage_model.transformer.` stripped -> our (diffusers) names."""
    pre = ldmbert_prefixes(layers)
    return {rename(k, pre, {}): v for k, v in sd.items()}


# OpenCLIP's text tower (SD 2.x single files, `cond_stage_model.model.` stripped) -> our CLIPTextModel names.
# Attention keeps q, k and v in one in_proj [3W, W] (torch.nn.MultiheadAttention): rows [0, W) are q, then k, v.
OPEN_CLIP_FIXED = {"token_embedding.weight": "embeddings.token_embedding.weight",
                   "positional_embedding": "embeddings.position_embedding.weight",
                   "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")  # the contrastive head: SD 2 uses the token states only


def clip_from_open_clip(sd: dict, layers: int) -> dict:
    """OpenCLIP text weights -> our names, keeping blocks 0..layers-1 (SD 2: 23 of the 24, the "penultimate"
    layer) and dropping the projection head. Blocks beyond `layers` are dropped only if the file has exactly one
    more (the real files); anything else stays and is reported by `check_fit`."""
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks.")}
    drop = {max(blocks)} if blocks and max(blocks) == layers else set()
    out = {}
    for k, v in sd.items():
        if k in OPEN_CLIP_UNUSED:
            continue
        if not k.startswith("transformer.resblocks."):
            out[OPEN_CLIP_FIXED.get(k, k)] = v
            continue
        i, rest = k.split(".", 3)[2:]
        if int(i) in drop:
            continue
        new = f"encoder.layers.{i}."
        if rest.startswith("attn.in_proj_"):  # in_proj_weight / in_proj_bias -> q/k/v_proj.weight / .bias
            kind = rest.removeprefix("attn.in_proj_")
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"{new}self_attn.{name}.{kind}"] = part
        else:
            out[new + rename_subkey(rest, OPEN_CLIP_BLOCK)] = v
    return out


def sdxl_text_from_sgm(sd: dict, cfg) -> dict:
    """SDXL's `conditioner.embedders.` tensors (prefix stripped) -> our SDXLTextEncoder names: embedder 0 is a
    transformers CLIPTextModel (`transformer.text_model.*`), embedder 1 open_clip's bigG tower (`model.*`, fused
    in_proj split, all its blocks kept: SDXL reads the penultimate states and the last block's pooled output)
    whose `text_projection` (used as x @ P) becomes a Linear weight P^T; `logit_scale` is dropped."""
    clip = {k.removeprefix("0.transformer.").removeprefix("text_model."): v for k, v in sd.items()
            if k.startswith("0.transformer.") and not k.endswith("position_ids")}  # text_model. as transformers 4
    big_g = split_prefix(sd, "1.model.")
    out = {"text_encoder." + k: v for k, v in clip.items()}
    layers = cfg.open_clip.num_hidden_layers
    out.update({"text_encoder_2." + k: v for k, v in clip_from_open_clip(big_g, layers).items()})
    if "text_projection" in big_g:
        out["text_encoder_2.text_projection.weight"] = big_g["text_projection"].t()
    known = {"0.transformer.text_model.embeddings.position_ids", "1.model.logit_scale"}
    out.update({"conditioner.embedders." + k: v for k, v in sd.items()  # anything else: reported by the loader
                if not k.startswith(("0.transformer.", "1.model.")) and k not in known})
    return out


def vae_prefixes(levels: int) -> dict[str, str]:
    """CompVis `encoder.down.i` / `decoder.up.i` -> our `down_blocks.i` / `up_blocks.(n-1-i)` (reversed)."""
    pairs = dict(VAE_FIXED)
    for i in range(levels):
        pairs[f"encoder.down.{i}.downsample.conv."] = f"encoder.down_blocks.{i}.downsamplers.0.conv."
        pairs[f"decoder.up.{i}.upsample.conv."] = f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.conv."
        for j in range(4):  # at most 3 resnets per level; unused prefixes never match
            pairs[f"encoder.down.{i}.block.{j}."] = f"encoder.down_blocks.{i}.resnets.{j}."
            pairs[f"decoder.up.{i}.block.{j}."] = f"decoder.up_blocks.{levels - 1 - i}.resnets.{j}."
    return pairs


def rename(key: str, prefixes: dict[str, str], subkeys: dict[str, str]) -> str:
    """Rewrite the longest matching prefix, then the first sub-key of the remainder."""
    for p in sorted((p for p in prefixes if key.startswith(p)), key=len, reverse=True)[:1]:
        key = prefixes[p] + rename_subkey(key[len(p):], subkeys)
    return key


def rename_subkey(rest: str, subkeys: dict[str, str]) -> str:
    for old, new in subkeys.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_from_compvis(sd: dict, cfg: UNetConfig) -> dict:
    """UNet weights with the `model.diffusion_model.` prefix already stripped -> our names."""
    pre = unet_prefixes(cfg)
    return {rename(k, pre, UNET_RESNET_RENAMES): v for k, v in sd.items()}


def vae_from_compvis(sd: dict, levels: int) -> dict:
    """VAE weights with the `first_stage_model.` prefix stripped -> our names; 1x1-conv attention squeezed."""
    pre, out = vae_prefixes(levels), {}
    for k, v in sd.items():
        k = rename(k, pre, VAE_RENAMES)
        if ".mid_block.attentions." in k and k.endswith(".weight") and v.ndim == 4:
            v = v[:, :, 0, 0]
        out[k] = v
    return out


def vae_from_diffusers(sd: dict) -> dict:
    """Accept both attention spellings of diffusers VAE files (SD 1.5 ships query/key/value/proj_attn)."""
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".attentions.0.")
        out[f"{head}.attentions.0.{rename_subkey(rest, VAE_DEPRECATED_ATTENTION)}" if rest else k] = v
    return out


def split_prefix(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


# --- loading into a module -------------------------------------------------------------------------

def _listing(keys, limit=8) -> str:
    keys = sorted(keys)
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_fit(module: torch.nn.Module, sd: dict, what: str, *, ignore: set[str] = frozenset()) -> dict:
    """`sd` without the keys we drop, after checking that it fits `module` exactly (any device, meta too).

    Keys in `ignore`, in the module's `unused_keys` (weights a checkpoint holds that the model does not
    use, e.g. LDMBert's `to_logits`), in IGNORED_KEYS, or ending in IGNORED_SUFFIXES are dropped silently;
    anything else that is missing, unexpected or mis-shaped is reported in one CheckpointError.
    """
    ignore = set(ignore) | set(getattr(module, "unused_keys", ()))
    sd = {k: v for k, v in sd.items()
          if k not in ignore and k not in IGNORED_KEYS and not k.endswith(IGNORED_SUFFIXES)}
    own = module.state_dict()
    missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
    misshaped = [f"{k} (file {list(sd[k].shape)}, model {list(own[k].shape)})"
                 for k in own.keys() & sd.keys() if sd[k].shape != own[k].shape]
    if missing or unexpected or misshaped:
        parts = [f"{len(missing)} missing: {_listing(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {_listing(unexpected)}" if unexpected else "",
                 f"{len(misshaped)} mis-shaped: {_listing(misshaped, 4)}" if misshaped else ""]
        raise CheckpointError(f"the {what} weights do not fit the {what} model; " + "; ".join(p for p in parts if p))
    return sd


def load_module(module: torch.nn.Module, sd: dict, what: str, *, dtype=None, device=None,
                ignore: set[str] = frozenset()) -> torch.nn.Module:
    """Load `sd` into `module` (built on the meta device or not), requiring an exact fit (`check_fit`)."""
    sd = check_fit(module, sd, what, ignore=ignore)
    dtype = dtype or next(iter(module.state_dict().values())).dtype
    sd = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype).contiguous()
          for k, v in sd.items()}
    module.load_state_dict(sd, strict=True, assign=True)
    return module
