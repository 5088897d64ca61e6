"""Text-to-image sampling: prompts -> psi(P), z_T -> z_0 by guided DDIM, z_0 -> image.

    z_T ~ N(0, I)                                          (drawn on a CPU generator, as diffusers)
    for t = T .. 1:
        eps = eps_u + w (eps_c - eps_u)                    classifier-free guidance, batch [uncond | cond]
        z_{t-1} = DDIM(z_t, eps)                           (models/ddim.py)
    x = D(z_0)                                             the VAE decoder

The loop is the one of the paper's Algorithm 1: an edit controller rides along, told the step and
the batch layout before every UNet call and given the latents after every step. The same code runs
both models of the paper: the family of the config (models/families.py) says which text encoder and
tokenizer to build (CLIP for Stable Diffusion v1, LDMBert and BERT WordPiece for LDM text2img).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from models.checkpoint import load_module
from models.ddim import DDIM
from models.errors import UserError
from models.families import family
from models.presets import ModelConfig, preset
from models.sdxl import SizeConditioning, split_conditioning
from models.tokenizer import PromptTokenizer
from models.unet import UNet
from models.vae import AutoencoderKL

from p2p.files.loading import read_model

from .controller import Controller, GuidanceLayout
from .sites import p2p_defaults
from .store import AttentionStore

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> float16 on a GPU, float32 on the CPU; strings as in --dtype."""
    if dtype is None:
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def to_images(x: torch.Tensor) -> list[Image.Image]:
    """Decoder output in [-1, 1] (B, 3, H, W) -> PIL images (rounded as diffusers does)."""
    x = (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]


class Pipeline:
    """A text-to-image latent diffusion model: tokenizer, text encoder, UNet, VAE and DDIM schedule."""

    def __init__(self, cfg: ModelConfig, unet: UNet, vae: AutoencoderKL, text_encoder: nn.Module,
                 tokenizer: PromptTokenizer, size_conditioning: SizeConditioning = SizeConditioning()):
        fam = family(cfg.family)
        if not isinstance(text_encoder, fam.text_encoder) or not isinstance(tokenizer, fam.tokenizer):
            raise TypeError(f"a {cfg.family!r} pipeline takes a {fam.text_encoder.__name__} and a "
                            f"{fam.tokenizer.__name__}, got a {type(text_encoder).__name__} and a "
                            f"{type(tokenizer).__name__}")
        if tokenizer.vocab_size > cfg.text.vocab_size:
            raise UserError(f"the tokenizer ({tokenizer.source}) has {tokenizer.vocab_size} tokens but the text encoder "
                            f"embeds {cfg.text.vocab_size}: a tokenizer of another model?")
        self.cfg, self.unet, self.vae, self.text_encoder, self.tokenizer = cfg, unet, vae, text_encoder, tokenizer
        if not size_conditioning.is_default and not unet.cfg.addition_time_embed_dim:
            raise UserError(f"original size, crop and target size condition SDXL only; this is a {fam.title} model: "
                            "leave them out")
        self.size_conditioning = size_conditioning
        self.ddim = DDIM(cfg.ddim)
        for m in (unet, vae, text_encoder):
            m.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    # --- construction --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, tokenizer=None, device=None, dtype=None, variant=None, ema=True,
                        config: str | ModelConfig | None = None) -> Pipeline:
        """Load a diffusers folder or a CompVis single file (then `tokenizer` is required) of either family.

        `config` names the preset a single file is read with (default: that of the family its keys show).
        """
        device = torch.device(device) if device else default_device()
        dtype = resolve_dtype(dtype, device)
        cfg, sds, tok_dir = read_model(path, variant=variant, ema=ema, config=config)
        fam = family(cfg.family)
        tok_path = tokenizer or tok_dir
        if tok_path is None:
            raise UserError(f"{path} carries no tokenizer: pass one (--tokenizer PATH): {fam.tokenizer_forms}")
        tok = tok_path if isinstance(tok_path, PromptTokenizer) else fam.tokenizer.from_path(tok_path)
        with torch.device("meta"):
            unet, vae, text = UNet(cfg.unet), AutoencoderKL(cfg.vae), fam.text_encoder(cfg.text)
        for module, name, what in ((unet, "unet", "UNet"), (vae, "vae", "VAE"), (text, "text", "text encoder")):
            load_module(module, sds.pop(name), what, dtype=dtype, device=device)
        return cls(cfg, unet, vae, text, tok)

    @classmethod
    def from_config(cls, cfg: str | ModelConfig, tokenizer, *, seed: int = 0, device=None, dtype=None) -> Pipeline:
        """Random weights (PyTorch's default init, seeded) of a preset: for tests and benchmarks."""
        cfg = preset(cfg) if isinstance(cfg, str) else cfg
        device = torch.device(device) if device else torch.device("cpu")
        torch.manual_seed(seed)
        fam = family(cfg.family)
        modules = UNet(cfg.unet), AutoencoderKL(cfg.vae), fam.text_encoder(cfg.text)
        tok = tokenizer if isinstance(tokenizer, PromptTokenizer) else fam.tokenizer.from_path(tokenizer)
        return cls(cfg, *(m.to(device, resolve_dtype(dtype, device)) for m in modules), tok)

    def attention_store(self, window=None) -> AttentionStore:
        """An AttentionStore keeping the layers the authors kept for this model (SD v1: <= 32x32 queries,
        LDM: <= 16x16; p2p/core/sites.py), over the steps of `window` (default all)."""
        return AttentionStore(p2p_defaults(self.cfg).store_sites, window=window)

    # --- the three stages ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> text states psi(P) (B, 77, width); SDXL: (B, 78, width), the last row its pooled vector
        (models/sdxl.py)."""
        tok = self.tokenizer
        ids = (tok.encode_pair if self.micro_conditioned else tok.encode)(list(prompts)).to(self.device)
        return self.text_encoder(ids).to(self.dtype)

    def encode_negative(self, negative_prompt: str = "") -> torch.Tensor:
        """The unconditional psi (1 row): the encoding of the negative prompt; for SDXL an empty one is zeros
        (diffusers' force_zeros_for_empty_prompt, sgm's demo zeroes the text embedders' outputs the same way)."""
        cond = self.encode_text([negative_prompt])
        return torch.zeros_like(cond) if family(self.cfg.family).zero_negative and not negative_prompt else cond

    @property
    def micro_conditioned(self) -> bool:
        return bool(self.cfg.unet.addition_time_embed_dim)

    def predict(self, z_t: torch.Tensor, t, context: torch.Tensor, controller: Controller | None = None) -> torch.Tensor:
        """The network's prediction at (z_t, t, psi): eps_theta, or v for a v-prediction model (DDIM reads either).
        SDXL: psi's vector row is the pooled embedding, and the size conditioning is `size_conditioning`'s (by
        default the image's own size, original = target = the latent's size x 8, crop (0, 0): diffusers' default)."""
        if not self.micro_conditioned:
            return self.unet(z_t, t, context, controller)
        states, pooled = split_conditioning(context, self.cfg.text.pooled_dim)
        s = self.cfg.vae_scale
        sizes = self.size_conditioning.time_ids(z_t.shape[-2] * s, z_t.shape[-1] * s, z_t.shape[0]).to(z_t.device)
        return self.unet(z_t, t, states, controller, added=(pooled, sizes))

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        s = self.cfg.vae_scale
        if height % s or width % s or height <= 0 or width <= 0:
            raise UserError(f"height and width must be positive multiples of {s}, got {height}x{width}")
        return 1, self.cfg.unet.in_channels, height // s, width // s

    def initial_latent(self, seed: int | torch.Generator, height: int, width: int) -> torch.Tensor:
        """z_T ~ N(0, I) of shape (1, 4, h, w): torch.randn on a CPU generator seeded with `seed` (the same draw
        as diffusers), or on the generator given (which sampling with eta > 0 then continues to draw from)."""
        g = seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(seed)
        return torch.randn(self.latent_shape(height, width), generator=g)

    @torch.no_grad()
    def denoise(self, z_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | Sequence[torch.Tensor],
                *, steps: int, guidance: float, eta: float = 0.0, generator: torch.Generator | None = None,
                controller: Controller | None = None, low_memory: bool = False, progress: bool = True,
                start: int = 0) -> torch.Tensor:
        """Guided DDIM from z_T (B or 1 rows) to z_0 (B rows), B = len(cond).

        `start` > 0 takes the first argument as the latent after `start` of the `steps` steps (z at the
        timestep of index `start`, as SDEdit noises an image) and runs the remaining ones; the controller still
        sees step indices of the whole schedule.

        `uncond` is the unconditional psi("") (B or 1 rows), or one such tensor per step (null-text
        inversion): a list, or a tensor (steps, B or 1, 77, width). With `low_memory` the two guidance
        branches run as two UNet calls. Guidance w <= 1 runs the conditional branch only (as diffusers).
        With eta > 0 the fresh noise of each step is drawn like z_T (one row when z_T has one) and shared
        by the prompts, as z_T is. The controller is told the number of steps, then each step and layout.
        """
        B = cond.shape[0]
        z = z_T.to(self.device, self.dtype).expand(B, *z_T.shape[1:])
        ctl = controller or Controller()
        timesteps = self.ddim.timesteps(steps)
        if eta > 0 and generator is None:
            raise ValueError("eta > 0 draws fresh noise every step: pass a generator")
        per_step = isinstance(uncond, (list, tuple)) or uncond.dim() == 4
        if per_step and len(uncond) != steps:
            raise UserError(f"uncond has {len(uncond)} per-step entries for {steps} steps: an inversion is "
                            f"made for one number of steps; sample with steps={len(uncond)}")
        if not 0 <= start < steps:
            raise UserError(f"start={start} is not a step of a {steps}-step schedule: give 0 <= start < {steps}")
        ctl.begin_sampling(steps)
        for i, t in enumerate(tqdm(timesteps[start:], disable=not progress, desc="denoising", leave=False), start):
            u = uncond[i] if per_step else uncond
            u = u.to(self.device, self.dtype).expand(B, *u.shape[1:])
            if guidance <= 1:
                ctl.begin_step(i, t, GuidanceLayout(B, None, slice(0, B)))
                eps = self.predict(z, t, cond, ctl)
            else:
                if low_memory:
                    ctl.begin_step(i, t, GuidanceLayout(B, slice(0, B), None))
                    eps_u = self.predict(z, t, u, ctl)
                    ctl.begin_step(i, t, GuidanceLayout(B, None, slice(0, B)))
                    eps_c = self.predict(z, t, cond, ctl)
                else:
                    ctl.begin_step(i, t, GuidanceLayout.batched(B))
                    eps_u, eps_c = self.predict(torch.cat([z, z]), t, torch.cat([u, cond]), ctl).chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            noise = None
            if eta > 0:  # one draw per row of z_T: prompts that share z_T share the noise (as diffusers for B=1)
                noise = torch.randn(z_T.shape, generator=generator, dtype=z.dtype, device=generator.device)
                noise = noise.to(z.device).expand_as(z)
            z = self.ddim.step(eps, t, z, steps, eta=eta, noise=noise)
            z = ctl.end_step(i, z)
        return z

    @torch.no_grad()
    def decode(self, z_0: torch.Tensor) -> list[Image.Image]:
        """z_0 (B, 4, h, w) -> B images, decoded one at a time to bound memory."""
        return [img for z in z_0.split(1) for img in to_images(self.vae.decode(z.to(self.dtype)))]

    # --- convenience ---------------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[str], *, seed: int = 0, steps: int | None = None,
                 guidance: float | None = None, height: int | None = None, width: int | None = None,
                 eta: float = 0.0, negative_prompt: str = "", controller: Controller | None = None,
                 low_memory: bool = False, progress: bool = True) -> list[Image.Image]:
        """Images for one or more prompts, all from the same seed's z_T (the same image as diffusers'
        StableDiffusionPipeline with an SD-configured DDIMScheduler, or LDMTextToImagePipeline with the
        folder's DDIMScheduler, and generator seed `seed`)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height, width = height or self.cfg.image_size, width or self.cfg.image_size
        g = torch.Generator("cpu").manual_seed(seed)
        z_T = self.initial_latent(g, height, width)
        cond = self.encode_text(prompts)
        uncond = self.encode_negative(negative_prompt)
        z_0 = self.denoise(z_T, cond, uncond, steps=steps or self.cfg.steps,
                           guidance=self.cfg.guidance if guidance is None else guidance, eta=eta, generator=g,
                           controller=controller, low_memory=low_memory, progress=progress)
        return self.decode(z_0)

    def with_config(self, **changes) -> Pipeline:
        """The same networks with other sampling defaults (e.g. steps, guidance)."""
        return Pipeline(replace(self.cfg, **changes), self.unet, self.vae, self.text_encoder, self.tokenizer,
                        self.size_conditioning)

    def with_size_conditioning(self, original_size: tuple[int, int] | None = None,
                               crops_coords_top_left: tuple[int, int] = (0, 0),
                               target_size: tuple[int, int] | None = None) -> Pipeline:
        """The same networks, SDXL conditioned on these sizes (models/sdxl.py `SizeConditioning`; the arguments of
        diffusers' StableDiffusionXLPipeline) in everything they sample: generation, edits, inversions. None: the
        image's own size. Refused for a model without SDXL's micro-conditioning.

            pipe.with_size_conditioning(original_size=(512, 512), crops_coords_top_left=(0, 256)).generate(...)
        """
        return Pipeline(self.cfg, self.unet, self.vae, self.text_encoder, self.tokenizer,
                        SizeConditioning(original_size, crops_coords_top_left, target_size))
