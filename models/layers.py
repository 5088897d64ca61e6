"""Building blocks shared by the UNet and the VAE: group norm, resnet block, down- and upsampling.

Names of parameters follow the diffusers checkpoints (norm1, conv1, time_emb_proj, norm2, conv2,
conv_shortcut, downsamplers.0.conv, upsamplers.0.conv), so a diffusers file loads by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed at least in float32 whatever the input dtype (as CompVis `GroupNorm32`): fp16 safe."""

    def forward(self, x):
        if x.dtype in (torch.float32, torch.float64):
            return super().forward(x)
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


class ResnetBlock(nn.Module):
    """h = conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(emb))))); return shortcut(x) + h.

    `temb_channels=None` gives the VAE's variant, which has no time embedding.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_ch) if temb_channels else None
        self.norm2 = GroupNorm32(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. The UNet pads 1 on every side; the VAE pads (0, 1, 0, 1) by hand first."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to `size`, to match an odd-sized skip connection), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some backends
            x = x.float()
        x = F.interpolate(x, scale_factor=2.0, mode="nearest") if size is None else \
            F.interpolate(x, size=size, mode="nearest")
        return self.conv(x.to(dtype))
