"""The KL-f8 autoencoder of Stable Diffusion v1 and LDM: images (3, H, W) <-> latents z (4, H/8, W/8).

Encoder: conv_in, 4 levels of 2 resnets (levels 0-2 end in a stride-2 conv padded (0,1,0,1)),
mid (resnet, single-head attention, resnet), norm, silu, conv_out to 2 x 4 channels, quant_conv:
the mean and log-variance of q(z|x). Decoder: post_quant_conv, conv_in, mid, 4 levels of 3 resnets
(levels 0-2 end in nearest x2 + conv), norm, silu, conv_out. All norms have eps 1e-6.
Latents are scaled by 0.18215 so that z has roughly unit variance (Rombach et al. 2022, Sec. 3 and G).

Names follow the diffusers `vae/` checkpoint (both attention spellings are mapped in checkpoint.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layers import Downsample, GroupNorm32, ResnetBlock, Upsample

EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder resnets per level; the decoder has one more
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215


class MidAttention(nn.Module):
    """Single-head self-attention over the h*w positions with a GroupNorm first and a residual add."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm32(groups, ch, eps=EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        h, w = x.shape[-2:]
        y = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")
        y = F.scaled_dot_product_attention(self.to_q(y), self.to_k(y), self.to_v(y))
        y = rearrange(self.to_out[0](y), "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + y


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, None, groups, EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([MidAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Level(nn.Module):
    def __init__(self, resnets, resampler=None, kind="downsamplers"):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        if resampler is not None:
            setattr(self, kind, nn.ModuleList([resampler]))

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        if hasattr(self, "downsamplers"):
            x = self.downsamplers[0](x)
        if hasattr(self, "upsamplers"):
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, G, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level([ResnetBlock((ch[i - 1] if i else ch[0]) if j == 0 else ch[i], ch[i], None, G, EPS)
                   for j in range(cfg.layers_per_block)],
                  Downsample(ch[i], padding=0) if i < n - 1 else None)
            for i in range(n))
        self.mid_block = MidBlock(ch[-1], G)
        self.conv_norm_out = GroupNorm32(G, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, G, n = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], G)
        self.up_blocks = nn.ModuleList(
            Level([ResnetBlock((ch[i - 1] if i else ch[0]) if j == 0 else ch[i], ch[i], None, G, EPS)
                   for j in range(cfg.layers_per_block + 1)],
                  Upsample(ch[i]) if i < n - 1 else None, kind="upsamplers")
            for i in range(n))
        self.conv_norm_out = GroupNorm32(G, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] (B, 3, H, W) -> mean and log-variance of q(z|x), unscaled (B, 4, H/8, W/8)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent z_0. The posterior mean, or a sample when a generator is given."""
        mean, logvar = self.posterior(x)
        z = mean
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device)
        return z * self.cfg.scaling_factor

    def decode(self, z_0: torch.Tensor) -> torch.Tensor:
        """Scaled latent z_0 -> image in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z_0 / self.cfg.scaling_factor))
