"""CLIP ViT-L/14 text encoder psi(P): the text states that Stable Diffusion v1 cross-attends to.

Pre-LayerNorm transformer, 12 layers of width 768, 12 heads, quick-GELU, learned absolute positions,
a causal mask, and a final LayerNorm. SD v1 uses the whole last hidden state (77 x 768) as context,
padding positions included; no pooled output, no clip-skip (Radford et al. 2021; Rombach et al. 2022).

SD 2.x uses OpenCLIP ViT-H/14 the same way with the last of its 24 blocks dropped (23 layers, GELU). SDXL uses two
towers differently (Podell et al. 2023; sd2-sdxl.md §3.3): the per-token states are the *input* of the last block,
without the final LayerNorm (`layer="penultimate"`), and OpenCLIP bigG/14 also gives a pooled vector: the final
LayerNorm of the last block's output at the end-of-text position, through `text_projection` (no bias).

Names follow the transformers checkpoint (`text_model.` prefix stripped on load; `text_projection` at the top level).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # x * sigmoid(1.702 x); "gelu" (OpenCLIP's towers, SD 2.x and SDXL)
    layer_norm_eps: float = 1e-5
    layer: str = "last"  # the states returned: "last" (final LayerNorm of the last block) | "penultimate" (SDXL)
    projection_dim: int = 0  # > 0: a pooled output through text_projection of this width (SDXL's bigG: 1280)

    @property
    def width(self) -> int:
        """Width of the text states psi(P), what the UNet's cross-attention keys are computed from."""
        return self.hidden_size


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # token i sees tokens 0..i
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)  # recomputed; checkpoints' position_ids are ignored
        return self.token_embedding(ids) + self.position_embedding(pos)[None]


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

        if cfg.layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {cfg.layer!r}")
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    @property
    def width(self) -> int:
        return self.cfg.hidden_size

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> text states psi(P) (B, 77, hidden_size)."""
        return self.states_and_pooled(ids)[0]

    def states_and_pooled(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (text states as `cfg.layer` says, pooled (B, projection_dim) or None). The pooled vector is read at
        the end-of-text token, the largest id of a row (argmax, as transformers does for these configs)."""
        x, penultimate = self.embeddings(ids), None
        for i, layer in enumerate(self.encoder.layers):
            if i == len(self.encoder.layers) - 1:
                penultimate = x
            x = layer(x)
        x = self.final_layer_norm(x)
        states = x if self.cfg.layer == "last" else penultimate
        if not self.cfg.projection_dim:
            return states, None
        eot = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return states, self.text_projection(eot)
