"""The UNet eps_theta(z_t, t, psi(P)) of Stable Diffusion v1/2.x and LDM text2img, built from a config.

Layout (SD v1, 64x64 latent; LDM is the same network at 32x32 with 1280-wide text states):

    conv_in -> down_blocks[0..3] -> mid_block -> up_blocks[0..3] -> conv_norm_out, silu, conv_out
    down level 0/1/2: 2 x (resnet, transformer), downsample      at 64 / 32 / 16
    down level 3:     2 x resnet                                  at 8
    mid:              resnet, transformer, resnet                 at 8
    up level 0:       3 x resnet, upsample                        at 8
    up level 1/2/3:   3 x (resnet, transformer), upsample but last at 16 / 32 / 64

Each transformer block has a self-attention `attn1` and a cross-attention `attn2` (the sites that
Prompt-to-Prompt edits, Sec. 3.1): 16 blocks, 32 attention layers. Module names equal the diffusers
checkpoint names, so a diffusers `unet/` file loads by name; CompVis names are mapped in checkpoint.py.

Stable Diffusion 2.x is the same network with three config changes (Stability-AI/stablediffusion
v2-inference.yaml): heads of width 64, so 5/10/20/20 heads per level (`heads` a tuple); `proj_in`/`proj_out`
as Linear layers on the (h w) tokens instead of 1x1 convs (`use_linear_projection`); and, for 2.1 at 768 px,
Q K^T and the softmax in float32 whatever the weights' dtype (`upcast_attention`), as its fp16 maps overflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import CrossAttention, Site
from .layers import Downsample, GroupNorm32, ResnetBlock, Upsample


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # down level i (and its mirror up) has transformers
    layers_per_block: int = 2
    heads: int | tuple[int, ...] = 8  # diffusers' `attention_head_dim` (a misnomer: the number of heads), per level
    cross_attention_dim: int = 768  # width of the text states psi(P): CLIP-L 768, OpenCLIP-H 1024, LDMBert 1280
    norm_num_groups: int = 32
    sample_size: int = 64  # native latent side (512 px / 8); sets Site.res
    use_linear_projection: bool = False  # SD 2.x: proj_in/proj_out are Linear, applied after flattening
    upcast_attention: bool = False  # SD 2.1 (768): Q K^T and softmax in float32 even for fp16 weights
    transformer_layers: int | tuple[int, ...] = 1  # transformer blocks per spatial transformer, per level (SDXL 1/2/10)
    # SDXL's micro-conditioning ("text_time"): the pooled text embedding and 6 size/crop numbers, each embedded as a
    # sinusoid of this width, through an MLP added to the timestep embedding. 0: none.
    addition_time_embed_dim: int = 0
    projection_class_embeddings_input_dim: int = 0  # pooled width + 6 * addition_time_embed_dim (SDXL 1280 + 1536)

    def __post_init__(self):
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError("attention_levels needs one entry per block_out_channels entry")
        for name in ("heads", "transformer_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) and len(v) != len(self.block_out_channels):
                raise ValueError(f"{name} is one number, or one per block_out_channels entry")

    def heads_at(self, level: int) -> int:
        """Number of attention heads of the transformers at `level` (the mid block: the last level)."""
        return self.heads if isinstance(self.heads, int) else self.heads[level]

    def depth_at(self, level: int) -> int:
        """Transformer blocks per spatial transformer at `level` (the mid block: the last level)."""
        return self.transformer_layers if isinstance(self.transformer_layers, int) else self.transformer_layers[level]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2)) (flip_sin_to_cos, shift 0)."""
    half = dim // 2
    f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * f[None]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class GEGLU(nn.Module):
    """proj: C -> 8C, split into value and gate: value * gelu(gate) (exact erf GELU)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])  # .1 is dropout

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """x += attn1(norm1(x)); x += attn2(norm2(x), psi(P)); x += ff(norm3(x))."""

    def __init__(self, dim: int, heads: int, context_dim: int, sites: tuple[Site, Site], upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, heads, site=sites[0], upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim, site=sites[1], upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, controller, hw):
        x = x + self.attn1(self.norm1(x), controller=controller, hw=hw)
        x = x + self.attn2(self.norm2(x), context, controller=controller, hw=hw)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """Spatial transformer: GroupNorm, projection in, one TransformerBlock over the h*w tokens, projection out.

    The projections are 1x1 convs (SD v1, LDM) or, with `linear`, Linear layers on the flattened tokens (SD 2.x);
    the two compute the same map, the checkpoints store them with different shapes ([C, C, 1, 1] vs [C, C]).
    """

    def __init__(self, dim: int, heads: int, context_dim: int, groups: int, sites: list[tuple[Site, Site]],
                 linear: bool = False, upcast: bool = False):
        super().__init__()
        self.linear = linear
        self.norm = GroupNorm32(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, context_dim, pair, upcast)
                                                 for pair in sites])
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x, context, controller):
        h, w = x.shape[-2:]
        r = x
        if self.linear:  # contiguous token-major copies: strided inputs send the Linear and the next conv down slow paths
            x = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c").contiguous())
        else:
            x = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            x = block(x, context, controller, (h, w))
        if self.linear:
            return rearrange(self.proj_out(x), "b (h w) c -> b c h w", h=h).contiguous() + r
        return self.proj_out(rearrange(x, "b (h w) c -> b c h w", h=h)) + r


class Block(nn.Module):
    """One level of the down or up path: resnets, optional transformers, optional resampler."""

    def __init__(self):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, L, G = cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups
        n, temb = len(ch), ch[0] * 4
        self.sites: list[Site] = []

        def transformer(dim, place, level, name):
            res, pairs = max(cfg.sample_size >> level, 1), []
            for j in range(cfg.depth_at(level)):
                k = len(self.sites) // 2
                pair = tuple(Site(f"{name}.transformer_blocks.{j}.attn{i + 1}", place, kind, level, res,
                                  len(self.sites) + i, k) for i, kind in enumerate(("self", "cross")))
                self.sites.extend(pair)
                pairs.append(pair)
            return Transformer2D(dim, cfg.heads_at(level), cfg.cross_attention_dim, G, pairs,
                                 linear=cfg.use_linear_projection, upcast=cfg.upcast_attention)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        if cfg.addition_time_embed_dim:
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb)

        skips = [ch[0]]  # channels of the skip tensors the down path pushes
        self.down_blocks = nn.ModuleList()
        for lvl in range(n):
            block, c_in = Block(), (ch[lvl - 1] if lvl else ch[0])
            for j in range(L):
                block.resnets.append(ResnetBlock(c_in if j == 0 else ch[lvl], ch[lvl], temb, G, 1e-5))
                if cfg.attention_levels[lvl]:
                    block.attentions.append(transformer(ch[lvl], "down", lvl, f"down_blocks.{lvl}.attentions.{j}"))
                skips.append(ch[lvl])
            if lvl < n - 1:
                block.downsamplers = nn.ModuleList([Downsample(ch[lvl], padding=1)])
                skips.append(ch[lvl])
            self.down_blocks.append(block)

        self.mid_block = Block()
        self.mid_block.resnets.extend([ResnetBlock(ch[-1], ch[-1], temb, G, 1e-5) for _ in range(2)])
        self.mid_block.attentions.append(transformer(ch[-1], "mid", n - 1, "mid_block.attentions.0"))

        self.up_blocks = nn.ModuleList()
        c_prev = ch[-1]
        for u in range(n):
            lvl = n - 1 - u
            block = Block()
            for j in range(L + 1):
                c_in = (c_prev if j == 0 else ch[lvl]) + skips.pop()
                block.resnets.append(ResnetBlock(c_in, ch[lvl], temb, G, 1e-5))
                if cfg.attention_levels[lvl]:
                    block.attentions.append(transformer(ch[lvl], "up", lvl, f"up_blocks.{u}.attentions.{j}"))
            if u < n - 1:
                block.upsamplers = nn.ModuleList([Upsample(ch[lvl])])
            self.up_blocks.append(block)
            c_prev = ch[lvl]

        self.conv_norm_out = GroupNorm32(G, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z_t: torch.Tensor, t, context: torch.Tensor, controller=None,
                added: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """eps_theta(z_t, t, context). `t` is an int or a tensor of shape () or (batch,). `added`: SDXL's
        (pooled text embedding (B, P), time ids (B, 6): original h, w, crop top, left, target h, w)."""
        t = torch.as_tensor(t, device=z_t.device).reshape(-1).expand(z_t.shape[0])
        emb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0]).to(z_t.dtype))
        if self.cfg.addition_time_embed_dim:
            if added is None:
                raise ValueError("this UNet is micro-conditioned (SDXL): pass added=(pooled text embedding, time ids)")
            pooled, time_ids = added
            sizes = timestep_embedding(time_ids.reshape(-1), self.cfg.addition_time_embed_dim)
            sizes = sizes.reshape(time_ids.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([pooled, sizes], dim=-1).to(emb.dtype))

        h = self.conv_in(z_t)
        skips = [h]
        for block in self.down_blocks:
            for j, resnet in enumerate(block.resnets):
                h = resnet(h, emb)
                if len(block.attentions):
                    h = block.attentions[j](h, context, controller)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)

        h = self.mid_block.resnets[0](h, emb)
        h = self.mid_block.attentions[0](h, context, controller)
        h = self.mid_block.resnets[1](h, emb)

        for block in self.up_blocks:
            for j, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
                if len(block.attentions):
                    h = block.attentions[j](h, context, controller)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h, size=skips[-1].shape[-2:])

        return self.conv_out(F.silu(self.conv_norm_out(h)))
