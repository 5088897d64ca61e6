"""Train the embedded default model: a tiny latent text-to-image model of the procedural scenes.

    python -m p2p.world.train --out runs/embedded            # all stages, resumable: run it again to continue
    python -m p2p.world.train --out runs/embedded --export p2p/embedded

Three stages, each seeded and checkpointed (model, optimiser, step, RNG) so that an interrupted run
continues where it stopped:
  1. tokenizer: a CLIP-format BPE (vocab.json + merges.txt) learned with `tokenizers` on the captions;
  2. vae: the KL autoencoder (our AutoencoderKL), reconstruction + a small KL term (Rombach et al. 2022);
  3. diffusion: the UNet and the CLIP-style text encoder, from scratch and jointly, with the objective
     ||y - y_theta(z_t, t, psi(P))||^2 of DDPM, the caption dropped 10% of the time so that classifier-free
     guidance works (Ho & Salimans 2022). By default y is v (Salimans & Ho 2022) on SD v1's betas rescaled to
     zero terminal SNR, sampled with trailing DDIM timesteps (Lin et al. 2024): SD v1's own schedule leaves
     alpha_bar_T = 0.0047, and on a 16x16 latent that much signal at t = T fixes the flat colours before the
     prompt can (the background followed the noise's leaked colour in 88% of samples after a short run; on the
     same 8-channel VAE, 1,500 steps read the background right in 96% of 48 prompts, against 12% for sd-v1).
     `--schedule sd-v1` trains the epsilon model of SD v1 instead. The model folder's [ddim] states which.
Data parallel on CPU cores (the VAE and diffusion stages): `torchrun --standalone --nproc-per-node 2 -m
p2p.world.train ...` runs one process per core with gloo; each takes --batch / N (--vae-batch / N) of the batch and
the gradients are averaged, so a step is the same step as one process's on the whole batch; the encoding of the
latents is shared out too. The tokenizer and the rendering run on rank 0 alone. On this
project's 2-core CPU, 2 processes x 1 thread take 0.77 s per step of batch 64, one process 1.33 s (1 or 2 threads).
The networks are the SD code paths (models/) at a small size: preset "embedded" in models/presets.py, with the
latent's channels set by --latent-channels.

The VAE recipe (short runs, 2,000 steps at batch 32, lr 2e-3, bf16; round trips of 96 scenes read by the judge):
    SD's 4 latent channels, plain L1 + L2           22.2 dB, every attribute read on  2% of scenes (colour 20%)
    8 channels                                      24.3 dB                          16%           (colour 46%)
    4 channels, things' pixels weighted 10x         25.8 dB                          37%           (colour 93%)
    8 channels, things' pixels weighted 10x         28.7 dB                          56%           (colour 98%)
    the same, 4,000 steps (the default; 26 min)     33.2 dB                          92%   (stripes read on 84%)
The things cover about a tenth of a scene: unweighted, the loss is spent on the background's texture.

The shipped model is this script's command in p2p/embedded/train.json. What each recipe change measured (short
runs, probes, full runs, the reasons a model was or was not shipped) is logged in p2p/world/train_notes.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from datetime import timedelta
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from models.clip import CLIPTextModel
from models.errors import UserError
from models.ddim import DDIM
from models.presets import ModelConfig, preset, to_toml
from models.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, bytes_to_unicode
from models.unet import UNet
from models.vae import AutoencoderKL, VAEConfig

from p2p.files.loading import NATIVE_CONFIG, read_native
from p2p.world import grounding, scenes

# The embedded model's architecture is the preset "embedded" (models/presets.py, configs/models/embedded.toml);
# a run sets the text encoder's vocabulary from the tokenizer it learns and the VAE scale from its latents.
EMBEDDED = preset("embedded")
_SCHEDULE_KEYS = ("prediction_type", "rescale_betas_zero_snr", "timestep_spacing", "steps_offset", "set_alpha_to_one")
SCHEDULES = {  # --schedule -> the DDIM settings the model is trained and sampled with
    "zero-snr-v": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                       steps_offset=0, set_alpha_to_one=True),  # Lin et al. 2024
    "sd-v1": {k: getattr(preset("sd-v1").ddim, k) for k in _SCHEDULE_KEYS},
}

SWAP_GROUPS = [list(scenes.SIZES), list(scenes.COLOURS), [p for p in scenes.PATTERNS if p != "plain"],  # "plain" is unwritten
               list(scenes.SHAPES)]

# --- stage 1: the caption tokenizer ----------------------------------------------------------------------

def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges, learned with `tokenizers` in the CLIP format (byte-level symbols, '</w>' word ends),
    enough of them that every word of the caption grammar is a single token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=100_000, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(words, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build_tokenizer(out_dir: Path) -> CLIPTokenizer:
    words = scenes.vocabulary() + ["a", "and", "on", "background"]
    merges = learn_merges(sorted(set(words)))
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer.from_path(out_dir)
    long = [w for w in set(words) if len(tok.tokens(w)) != 1]
    if long:
        raise RuntimeError(f"words that are not single tokens: {long}")
    return tok


# --- data ----------------------------------------------------------------------------------------------

def dataset(n: int, seed: int, cache: Path):
    """n (image tensor, caption, discs) triples from the scene generator, cached on disk (images as uint8).
    discs (n, 2, 3): each thing's bounding circle (cx, cy, radius) in pixels, zeros where a scene has one thing."""
    if cache.is_file():
        d = torch.load(cache, weights_only=True)
        if "discs" in d:  # caches written before the discs were kept are rendered again
            return d["images"], d["captions"], d["discs"]
    images, captions, discs = [], [], torch.zeros(n, 2, 3)
    for start in tqdm(range(0, n, 1000), desc="rendering scenes", leave=False):
        batch = scenes.sample(min(1000, n - start), seed + start)
        images.append(torch.from_numpy(np.stack([np.asarray(i) for i, _, _ in batch])))
        captions += [c for _, c, _ in batch]
        for k, (image, _, scene) in enumerate(batch):
            for j, t in enumerate(scene.things):
                discs[start + k, j] = torch.tensor([t.cx, t.cy, scenes.EXTENT * t.r]) * image.size[0]
    images = torch.cat(images).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W) uint8
    torch.save({"images": images, "captions": captions, "discs": discs}, cache)
    return images, captions, discs


def object_weights(discs: torch.Tensor, size: int, weight: float, margin: float = 2.0,
                   image_size: int | None = None) -> torch.Tensor:
    """(B, 1, size, size) loss weights of the cells of a size x size grid over the image (its pixels by default,
    or the latent's cells): `weight` where a cell's centre lies inside a thing's bounding circle grown by `margin`
    pixels, 1 elsewhere. The things cover about 10% of a scene, so an unweighted loss spends the autoencoder's
    capacity on the background's texture and lets a small object's colour and pattern go (measured: after 2,000
    steps the round trip kept the colour of 20% of the things, and the background of all of them)."""
    inside = grounding.disc_masks(discs, (size, size), image_size or size, margin).amax(dim=1)  # (B, size * size)
    return 1 + (weight - 1) * inside.view(-1, 1, size, size)


def as_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float() / 127.5 - 1


# --- checkpoints -----------------------------------------------------------------------------------------

def save_state(path: Path, step: int, modules: dict, opt, extra=None):
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, "modules": {k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(),
                "rng": torch.get_rng_state(), "extra": extra or {}}, tmp)
    os.replace(tmp, path)


def load_state(path: Path, modules: dict, opt):
    s = torch.load(path, weights_only=True)
    for k, m in modules.items():
        m.load_state_dict(s["modules"][k])
    opt.load_state_dict(s["opt"])
    torch.set_rng_state(s["rng"])
    return s["step"], s["extra"]


class Log:
    """Appends one JSON line per logged step (loss curves survive interruptions)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, **row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


# --- stage 2: the autoencoder ------------------------------------------------------------------------------

def train_vae(cfg: ModelConfig, images: torch.Tensor, run: Path, steps: int, batch: int, lr: float, seed: int,
              kl_weight: float = 1e-6, bf16: bool = False, discs: torch.Tensor | None = None,
              object_weight: float = 1.0, scale_equivariance: float = 0.0, rank: int = 0,
              world: int = 1) -> AutoencoderKL:
    """bf16: autocast the networks (the loss stays float32); with channels_last, 1.7x the steps per second of
    float32 on a CPU with AVX512-BF16 (measured at 1 thread). object_weight: the reconstruction loss of the pixels
    on and around the things (`discs`) counts this many times a background pixel's (see `object_weights`).
    scale_equivariance > 0: adds this times the loss of decoding the latent shrunk by s (2 or 4, drawn per step)
    against the image shrunk by s (Skorokhodov et al. 2025): the latent's low frequencies must then carry the
    image's, which takes out the high-frequency content that a diffusion model draws worst.
    rank, world: as in `train_diffusion` (each rank draws batch // world images; rank 0 writes)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg.vae).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    ckpt, log = run / "vae.pt", Log(run / "vae_log.jsonl")
    step = load_state(ckpt, {"vae": vae}, opt)[0] if ckpt.is_file() else 0
    g = torch.Generator().manual_seed(seed + step + 1_000_003 * rank)  # one process: the generator it always had
    share = batch // world
    bar = tqdm(total=steps, initial=step, desc="vae", disable=step >= steps or rank > 0)  # none when trained
    while step < steps:
        for group in opt.param_groups:  # cosine decay to 5% (the annealed end sharpens the reconstructions)
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(len(images), (share,), generator=g)
        x = as_float(images[idx]).contiguous(memory_format=torch.channels_last)
        w = object_weights(discs[idx], x.shape[-1], object_weight) if object_weight != 1 else torch.ones(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            mean, logvar = vae.posterior(x)
            # Decode the posterior mean: with a KL weight this small a sampled z only adds noise that the decoder
            # must learn to see through (it blurred the shapes after 1000 steps); the KL term keeps z's scale tame.
            rec = vae.decoder(vae.post_quant_conv(mean))
            if scale_equivariance > 0:
                s = (2, 4)[int(torch.randint(2, (1,), generator=g))]
                rec_small = vae.decoder(vae.post_quant_conv(F.avg_pool2d(mean, s)))
        mean, logvar, rec = mean.float(), logvar.float(), rec.float()
        rec_loss = weighted_l1_l2(rec, x, w)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = rec_loss + kl_weight * kl
        extra = {}
        if scale_equivariance > 0:
            w_small = F.avg_pool2d(w, s) if w.dim() == 4 else w
            se_loss = weighted_l1_l2(rec_small.float(), F.avg_pool2d(x, s), w_small)
            loss = loss + scale_equivariance * se_loss
            extra["se"] = se_loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            average_gradients(list(vae.parameters()), world, loss)
        opt.step()
        step += 1
        bar.update(1)
        if step % 50 == 0 and rank == 0:  # rank 0's share of the batch
            bar.set_postfix(rec=f"{rec_loss.item():.4f}", kl=f"{kl.item():.0f}")
            log(step=step, rec=rec_loss.item(), kl=kl.item(), **extra)
        if (step % 500 == 0 or step == steps) and rank == 0:
            save_state(ckpt, step, {"vae": vae}, opt)
    bar.close()
    return vae.to(memory_format=torch.contiguous_format).eval()


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), where bf16 autocast takes the VAE stage
    1.7x as fast as float32. Elsewhere bf16 is emulated: on a 2-core AVX2 EPYC a VAE step took 8x as long as
    float32's (33 s against 4.2 s at batch 32, 1 thread), so --vae-bf16 defaults to this."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def vae_from(folder: Path, cfg: VAEConfig) -> AutoencoderKL:
    """A native model folder's VAE (p2p/embedded, an --export; read by `read_native`), to start the VAE stage
    from. Raises UserError naming the problem when the folder is no native model or its VAE is not of `cfg`."""
    if not (folder / NATIVE_CONFIG).is_file():
        raise UserError(f"{folder} has no {NATIVE_CONFIG}: give a native model folder (p2p/embedded, an --export)")
    folder_cfg, sds, _ = read_native(folder)
    if folder_cfg.vae.latent_channels != cfg.latent_channels:
        raise UserError(f"{folder}'s VAE has {folder_cfg.vae.latent_channels} latent channels, not "
                        f"{cfg.latent_channels}: set --latent-channels {folder_cfg.vae.latent_channels}")
    vae = AutoencoderKL(cfg)
    vae.load_state_dict({k: v.float() for k, v in sds["vae"].items()})
    return vae


def weighted_l1_l2(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstruction loss, |err| + err^2, averaged with the pixel weights w (1 or like `object_weights`)."""
    err = rec - x
    return ((err.abs() + err ** 2) * w).mean() / w.mean()


@torch.no_grad()
def encode_all(vae: AutoencoderKL, images: torch.Tensor, batch: int = 500, rank: int = 0,
               world: int = 1) -> torch.Tensor:
    """Posterior means of every image, unscaled (B, c, h, w). Under torchrun each rank encodes a 1 / world share
    and every rank receives the whole."""
    share = -(-len(images) // world)
    mine = images[rank * share:(rank + 1) * share]
    z = torch.cat([vae.posterior(as_float(mine[i:i + batch]))[0] for i in range(0, len(mine), batch)]
                  or [vae.posterior(as_float(images[:1]))[0][:0]])  # a rank with no share: an empty (0, c, h, w)
    if world == 1:
        return z
    padded = z.new_zeros((share,) + z.shape[1:])  # all_gather takes equal sizes
    padded[:len(z)] = z
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:len(images)]


# --- stage 3: the diffusion model --------------------------------------------------------------------------

def average_gradients(params: list, world: int, loss: torch.Tensor) -> float:
    """Data parallelism by hand: one all-reduce of every gradient (and the loss, for the log), divided by the
    number of processes; returns the mean loss. With equal shares of the batch on each rank this is the gradient
    of the whole batch, so every rank takes the same optimiser step and the replicas stay equal."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1)])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view(g.shape))
        offset += g.numel()
    return flat[-1].item()


def snr_weights(alpha_bar_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023). In units of the error on z_0, the eps loss
    weighs a timestep by SNR_t = alpha_bar_t / (1 - alpha_bar_t) and the v loss by SNR_t + 1; these weights make
    it min(SNR_t, gamma) for either. Under v the near-pure-noise timesteps (SNR < 0.05: 28% of them on the
    zero-SNR schedule) otherwise weigh about as much as the middle ones, where a thing's outline is decided."""
    snr = alpha_bar_t / (1 - alpha_bar_t)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def train_diffusion(cfg: ModelConfig, latents: torch.Tensor, ids: torch.Tensor, empty_ids: torch.Tensor, run: Path,
                    steps: int, batch: int, lr: float, seed: int, p_uncond: float = 0.1, ema_decay: float = 0.999,
                    rank: int = 0, world: int = 1, min_snr_gamma: float = 0.0, ground_weight: float = 0.0,
                    owners: torch.Tensor | None = None, discs: torch.Tensor | None = None, object_weight: float = 1.0,
                    context_weight: float = 0.0, swap: tuple | None = None, bf16: bool = False,
                    object_weight_by_signal: bool = False, object_weight_until: int = 0):
    """rank, world: this process's place under torchrun; each rank draws batch // world samples from its own
    generator and `average_gradients` makes the step the whole batch's. Rank 0 alone writes checkpoints and logs.
    min_snr_gamma > 0: each sample's loss is weighted so that its error on z_0 counts min(SNR_t, gamma) times
    (Min-SNR-gamma, Hang et al. 2023), see `snr_weights`; 0 leaves the plain eps or v loss.
    ground_weight > 0: adds this times the grounding loss of the cross-attention maps (p2p/world/grounding.py),
    with owners (n, 77) from `grounding.token_owners` and discs (n, 2, 3) from `dataset`.
    object_weight != 1: each sample's error is averaged over the latent's cells with the weights of
    `object_weights` (the things' cells count this many times a background cell), so that the few cells where a
    thing's outline is drawn are not outweighed by the background's texture.
    object_weight_by_signal: the weight's excess scales with alpha_bar_t, 1 + (object_weight - 1) alpha_bar_t. A
    weighted loss's optimum is no longer the posterior mean but E[w x_0 | z_t] / E[w | z_t]; where z_t does not yet
    tell where the thing is, that pulls the prediction towards the thing's colour wherever it might be, and the
    sampler then draws it there more than once. At pure noise this leaves the loss unweighted.
    object_weight_until > 0: the object weight holds for the steps before this one and the loss is unweighted from
    it on (the shapes come under the weight; the steps after it unlearn the copies it draws).
    context_weight > 0: adds this times the context loss of the text states (`grounding.context_loss`), with
    swap = (class_of, members) from `grounding.swap_classes`.
    bf16: autocast the text encoder and the UNet to bfloat16 (the weights, the losses and AdamW stay float32)."""
    torch.manual_seed(seed)  # the same initial weights on every rank
    unet, text = UNet(cfg.unet), CLIPTextModel(cfg.text)
    unet = unet.to(memory_format=torch.channels_last)  # 1.14x the steps per second on CPU (1 thread)
    ema_unet, ema_text = UNet(cfg.unet).requires_grad_(False), CLIPTextModel(cfg.text).requires_grad_(False)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text.state_dict())
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    modules = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text}
    ckpt, log = run / "diffusion.pt", Log(run / "diffusion_log.jsonl")
    step = load_state(ckpt, modules, opt)[0] if ckpt.is_file() else 0
    ddim = DDIM(cfg.ddim)
    alpha_bar = ddim.alpha_bar
    g = torch.Generator().manual_seed(seed + step + 1_000_003 * rank)
    warmup, share = 500, batch // world
    bar = tqdm(total=steps, initial=step, desc="diffusion", disable=rank > 0)
    while step < steps:
        idx = torch.randint(len(latents), (share,), generator=g)
        z0 = latents[idx] * cfg.vae.scaling_factor
        tokens = ids[idx].clone()
        dropped = torch.rand(share, generator=g) < p_uncond
        tokens[dropped] = empty_ids  # learn psi("") for guidance
        t = torch.randint(cfg.ddim.num_train_timesteps, (share,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps  # q(z_t | z_0)
        z_t = z_t.contiguous(memory_format=torch.channels_last)
        recorder = grounding.MapRecorder() if ground_weight > 0 else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if context_weight > 0:  # the caption and a one-word swap of it, through the text encoder together
                swapped, pos = grounding.swap_one_word(tokens, owners[idx], *swap, ~dropped, g)
                cond, cond_swapped = text(torch.cat([tokens, swapped])).float().chunk(2)
            else:
                cond = text(tokens).float()
            y = unet(z_t, t, cond, recorder).float()
        err = (y - ddim.target(z0, eps, t)) ** 2  # eps or v, as cfg.ddim says
        if object_weight != 1 and not 0 < object_weight_until <= step:
            w = object_weights(discs[idx], z0.shape[-1], object_weight, image_size=cfg.image_size)
            if object_weight_by_signal:
                w = 1 + (w - 1) * a
            per_sample = (err * w).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3))
        else:
            per_sample = err.mean(dim=(1, 2, 3))
        if min_snr_gamma > 0:
            loss = (snr_weights(alpha_bar[t], min_snr_gamma, cfg.ddim.prediction_type) * per_sample).mean()
        else:
            loss = per_sample.mean()
        extra = {}
        if recorder is not None:
            keep = ~dropped & (alpha_bar[t] >= grounding.MIN_ALPHA_BAR)
            ground = grounding.grounding_loss(recorder.maps, owners[idx], discs[idx], keep, cfg.image_size)
            loss = loss + ground_weight * ground
            extra["ground"] = ground.item()  # this rank's share of the batch
        if context_weight > 0:
            kept = grounding.context_loss(cond, cond_swapped, owners[idx], pos)
            loss = loss + context_weight * kept
            extra["context"] = kept.item()
        for group in opt.param_groups:  # linear warm-up, then cosine decay to 10%
            frac = step / max(steps, 1)
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = average_gradients(params, world, loss) if world > 1 else loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, p in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(p, 1 - ema_decay)
        step += 1
        bar.update(1)
        if step % 50 == 0 and rank == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}")
            log(step=step, loss=loss_value, lr=opt.param_groups[0]["lr"], **extra)
        if (step % 500 == 0 or step == steps) and rank == 0:
            save_state(ckpt, step, modules, opt)
    bar.close()
    return ema_unet.to(memory_format=torch.contiguous_format).eval(), ema_text.eval()


# --- export ------------------------------------------------------------------------------------------------

def export(out: Path, cfg: ModelConfig, unet, vae, text, tokenizer_dir: Path, meta: dict) -> None:
    """A native model folder: model.toml, model.safetensors (fp16, prefixes unet./vae./text.), tokenizer/."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().to(torch.float16).contiguous()
               for name, m in (("unet", unet), ("vae", vae), ("text", text)) for k, v in m.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "p2p-native"})
    (out / "model.toml").write_text(to_toml(cfg))
    tok_out = out / "tokenizer"
    tok_out.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (tok_out / name).write_bytes((tokenizer_dir / name).read_bytes())
    (out / "train.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/embedded", help="run folder: checkpoints, logs, cached data")
    p.add_argument("--export", help="also write the trained model as a native model folder here")
    p.add_argument("--images", type=int, default=60_000)
    p.add_argument("--vae-steps", type=int, default=4000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast in the VAE stage (default: on where the CPU computes bf16 natively, "
                        "AVX512-BF16 or AMX, where it is 1.7x as fast as float32; off elsewhere, where it is "
                        "emulated and 8x slower)")
    p.add_argument("--latent-channels", type=int, default=8,
                   help="channels of the VAE's 16x16 latent (SD's 4 hold neither the colour nor the pattern of a small "
                        "thing; see the VAE notes in the module docstring)")
    p.add_argument("--vae-object-weight", type=float, default=10.0,
                   help="weight of the pixels on and around the things in the VAE's reconstruction loss (1: unweighted)")
    p.add_argument("--vae-scale-equivariance", type=float, default=0.0,
                   help="weight of the VAE's scale-equivariance loss (decode the latent shrunk 2x or 4x against the "
                        "image shrunk as much; Skorokhodov et al. 2025); 0: none")
    p.add_argument("--vae-from", metavar="DIR",
                   help="start the VAE stage from this model folder's VAE, counted as 4,000 steps done: used as it is "
                        "with --vae-steps 4000, tuned further with more (a run that has its own vae.pt keeps it)")
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default="zero-snr-v",
                   help="zero-snr-v: SD v1's betas rescaled to zero terminal SNR, v-prediction, trailing DDIM "
                        "(Lin et al. 2024); sd-v1: SD v1's schedule and the epsilon objective")
    p.add_argument("--steps", type=int, default=20_000, help="diffusion training steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-snr-gamma", type=float, default=0.0,
                   help="weight the diffusion loss by Min-SNR-gamma (Hang et al. 2023), e.g. 5; 0: unweighted")
    p.add_argument("--ground-weight", type=float, default=0.0,
                   help="weight of the loss that grounds each object word's cross-attention map on its object "
                        "(p2p/world/grounding.py); 0: none")
    p.add_argument("--context-weight", type=float, default=0.0,
                   help="weight of the loss that keeps the text states of the words outside an object's phrase where "
                        "they were when one of its words is swapped (p2p/world/grounding.py); 0: none")
    p.add_argument("--object-weight", type=float, default=1.0,
                   help="weight of the latent cells on and around the things in the diffusion loss (1: unweighted)")
    p.add_argument("--object-weight-by-signal", action="store_true",
                   help="scale the object weight's excess by the signal fraction alpha_bar_t: unweighted at pure noise, "
                        "where the things' places are not yet decided and a weighted loss draws them more than once")
    p.add_argument("--object-weight-until", type=int, default=0, metavar="STEP",
                   help="the object weight holds until this diffusion step, the loss is unweighted after it "
                        "(0: all steps)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast in the diffusion stage (off by default; worth it only where the CPU computes "
                        "bf16 natively, see --vae-bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("min_snr_gamma", "ground_weight", "context_weight", "vae_scale_equivariance", "object_weight_until"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (0 turns it off), got {getattr(args, name)}")
    for name in ("object_weight", "vae_object_weight"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0 (1 leaves the loss unweighted), got {getattr(args, name)}")
    if args.vae_bf16 is None:
        args.vae_bf16 = native_bf16()  # train.json records what was used
    for name in ("batch", "vae_batch"):
        if getattr(args, name) % world:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)} does not split over {world} processes: give a "
                    f"multiple of {world}")
    start_vae = None
    if args.vae_from:  # checked on every rank before any waits for another
        try:
            start_vae = vae_from(Path(args.vae_from), replace(EMBEDDED.vae, latent_channels=args.latent_channels))
        except UserError as e:
            p.error(f"--vae-from: {e}")
    if world > 1:  # under torchrun; the long timeout covers rank 0's rendering, which the others wait for
        dist.init_process_group("gloo", timeout=timedelta(hours=6))
    rank = dist.get_rank() if world > 1 else 0
    if rank > 0:
        dist.barrier()  # rank 0 learns the tokenizer and renders the data; the others then read its files
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    t0, commit = time.time(), git_commit()  # the code that trains, not whatever is checked out at the end
    tok = build_tokenizer(run / "tokenizer") if rank == 0 else CLIPTokenizer.from_path(run / "tokenizer")
    c = args.latent_channels
    cfg = replace(EMBEDDED, text=replace(EMBEDDED.text, vocab_size=tok.vocab_size),
                  vae=replace(EMBEDDED.vae, latent_channels=c), unet=replace(EMBEDDED.unet, in_channels=c, out_channels=c),
                  ddim=replace(EMBEDDED.ddim, **SCHEDULES[args.schedule]))
    images, captions, discs = dataset(args.images, args.seed, run / "data.pt")
    if rank == 0 and start_vae is not None and not (run / "vae.pt").is_file():  # as 4,000 steps done, fresh AdamW
        save_state(run / "vae.pt", 4000, {"vae": start_vae}, torch.optim.AdamW(start_vae.parameters()))
    if rank == 0 and world > 1:
        dist.barrier()
    vae = train_vae(cfg, images, run, args.vae_steps, args.vae_batch, args.vae_lr, args.seed, bf16=args.vae_bf16,
                    discs=discs, object_weight=args.vae_object_weight,
                    scale_equivariance=args.vae_scale_equivariance, rank=rank, world=world)
    latents_path = run / f"latents_vae{args.vae_steps}.pt"  # a VAE trained further encodes afresh
    if latents_path.is_file():
        latents = torch.load(latents_path, weights_only=True)
    else:
        latents = encode_all(vae, images, rank=rank, world=world)
        if rank == 0:
            torch.save(latents, latents_path)
    cfg = replace(cfg, vae=replace(cfg.vae, scaling_factor=round(1.0 / latents.std().item(), 5)))
    ids = tok.encode(captions)
    unet, text = train_diffusion(cfg, latents, ids, tok.encode([""])[0], run, args.steps, args.batch, args.lr, args.seed,
                                 rank=rank, world=world, min_snr_gamma=args.min_snr_gamma,
                                 ground_weight=args.ground_weight, owners=grounding.token_owners(captions), discs=discs,
                                 object_weight=args.object_weight, context_weight=args.context_weight,
                                 swap=grounding.swap_classes(tok, SWAP_GROUPS, tok.vocab_size), bf16=args.bf16,
                                 object_weight_by_signal=args.object_weight_by_signal,
                                 object_weight_until=args.object_weight_until)
    if world > 1:
        dist.destroy_process_group()
    if rank > 0:
        return
    launcher = f"torchrun --standalone --nproc-per-node {world} -m" if world > 1 else "python -m"
    meta = {"command": f"{launcher} p2p.world.train " + " ".join(argv if argv is not None else os.sys.argv[1:]),
            "commit": commit, "seconds": round(time.time() - t0), "args": vars(args),
            "hardware": f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()}"
                        f"{', native bf16' if native_bf16() else ''}), {world} process(es) x "
                        f"{torch.get_num_threads()} threads, torch {torch.__version__}", "config": asdict(cfg)}
    (run / "train.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if args.export:
        export(Path(args.export), cfg, unet, vae, text, run / "tokenizer", meta)


if __name__ == "__main__":
    main()
