"""Attention where the map M = softmax(Q K^T / sqrt(d)) is ours to read and replace.

Prompt-to-Prompt (Hertz et al., ICLR 2023, Sec. 3.1) edits images by editing the cross-attention maps

    Q = l_Q(phi(z_t)),  K = l_K(psi(P)),  V = l_V(psi(P)),  M = softmax(Q K^T / sqrt(d)),  out = M V

of the UNet. Every attention layer of the UNet is a `CrossAttention` that knows, from the moment the
network is built, *where* it is: a `Site` (its state-dict name, its place down/mid/up, self or cross,
its resolution). At call time an optional controller is passed down explicitly. For a site the
controller wants (`wants_map`), the map M is materialised, handed to the controller, and whatever it returns is
multiplied with V. Every other site runs the fused `F.scaled_dot_product_attention` kernel, so a
controller that only looks at the 16x16 cross-attention layers pays for nothing else.

No hooks, no monkey-patching, no global state: the controller is an argument of the forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class Site:
    """Where an attention layer sits in the UNet. Fixed when the network is built."""

    name: str  # state-dict name, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    place: str  # "down" | "mid" | "up"
    kind: str  # "self" | "cross"
    level: int  # the latent is downsampled by 2**level at this layer
    res: int  # side of the attention grid at the model's native sample size (SD v1: 64/32/16/8)
    index: int  # position among all attention layers, in forward order (SD v1: 0..31)
    block: int  # position among the transformer blocks, in forward order (SD v1: 0..15)

    @property
    def is_cross(self) -> bool:
        return self.kind == "cross"


class AttentionController(Protocol):
    """What the UNet needs of a controller: which sites it wants, and what it does with their maps.

    `wants_map` is asked at every call of every attention layer, with the spatial size (h, w) of the
    queries at this call. `on_map` receives M of the whole batch, (batch, heads, queries, keys) with
    queries = h * w, and returns a tensor of the same shape; it must not modify M in place.
    `p2p.core.controller.Controller` implements both for the editing code.
    """

    def wants_map(self, site: Site, hw: tuple[int, int]) -> bool: ...

    def on_map(self, M: torch.Tensor, site: Site, hw: tuple[int, int]) -> torch.Tensor: ...


def attention_map(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """M = softmax(Q K^T * scale) over the keys (Eq. 1 of the paper), the softmax at least in float32."""
    sim = torch.matmul(q, k.transpose(-1, -2)) * scale
    return sim.to(torch.promote_types(sim.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)


class CrossAttention(nn.Module):
    """Multi-head attention of the UNet's transformer blocks (`attn1` self, `attn2` cross).

    Parameter names follow the checkpoint: to_q, to_k, to_v (no bias), to_out.0 (with bias). With `upcast`
    (SD 2.1 at 768 px) Q K^T and the softmax are computed in float32 whatever the weights' dtype.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, site: Site | None = None,
                 upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.scale = (dim // heads) ** -0.5
        self.site = site
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x, context=None, controller: AttentionController | None = None, hw=None):
        ctx = x if context is None else context
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k = q.float(), k.float()
        if controller is not None and controller.wants_map(self.site, hw):
            M = attention_map(q, k, self.scale).to(dtype)  # (b, heads, queries, keys)
            M = controller.on_map(M, self.site, hw)
            out = torch.matmul(M.to(v.dtype), v)
        else:
            out = F.scaled_dot_product_attention(q, k, v.to(q.dtype)).to(dtype)
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))
