"""LDMBert: the text encoder psi(P) of LDM text2img-large-256 (LDM-KL-8-G), the paper's second model.

A 32-layer transformer encoder trained from scratch with the diffusion model (Rombach et al. 2022,
Sec. 4.3.1; CompVis `BERTEmbedder` on an x-transformers `Encoder`), over BERT's uncased WordPiece
tokens (models/wordpiece.py). Pre-LayerNorm blocks of width 1280:

    x = embed_tokens(ids) + embed_positions(0..76)
    32 x:  x += out_proj(attention(self_attn_layer_norm(x)))     8 heads of 64: inner width 512,
           x += fc2(gelu(fc1(final_layer_norm(x))))             q/k/v without bias, exact GELU, 5120 wide
    psi(P) = layer_norm(x)                                         (B, 77, 1280)

No attention mask: padding tokens ([PAD] = 0) attend and are attended, as in training and in both the
CompVis and the diffusers samplers. All LayerNorms have eps 1e-5.

Names follow the diffusers `bert/` checkpoint (`model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`,
...); the CompVis x-transformers names are mapped by a table in checkpoint.py. The files also hold
`to_logits` (1280 -> 30522, a language-model head the sampler never uses): we do not build it (39M
parameters, 156 MB in fp32) and drop it on load by name (`LDMBertModel.unused_keys`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import UserError

LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class LDMBertConfig:
    """Field names are those of diffusers' `LDMBertConfig` (bert/config.json)."""

    vocab_size: int = 30522  # bert-base-uncased WordPiece
    max_position_embeddings: int = 77
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_ffn_dim: int = 5120
    encoder_attention_heads: int = 8
    head_dim: int = 64  # inner attention width heads * head_dim = 512, not d_model
    activation_function: str = "gelu"  # exact (erf) GELU

    @property
    def width(self) -> int:
        """Width of the text states psi(P), what the UNet's cross-attention keys are computed from."""
        return self.d_model


class LDMBertAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, inner, bias=False) for _ in range(3))
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x):
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), no mask
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class LDMBertLayer(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        if cfg.activation_function != "gelu":
            raise UserError(f"LDMBert activation {cfg.activation_function!r} is not supported (LDM uses 'gelu')")
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.self_attn = LDMBertAttention(cfg.d_model, cfg.encoder_attention_heads, cfg.head_dim)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)

    def forward(self, x):
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class LDMBertEncoder(nn.Module):
    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.layers = nn.ModuleList([LDMBertLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.layer_norm = nn.LayerNorm(cfg.d_model, eps=LAYER_NORM_EPS)

    def forward(self, ids):
        x = self.embed_tokens(ids) + self.embed_positions(torch.arange(ids.shape[1], device=ids.device))[None]
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)


class LDMBertModel(nn.Module):
    # in every checkpoint, never used to sample: dropped by name on load (see the module docstring)
    unused_keys = frozenset({"to_logits.weight", "to_logits.bias"})

    def __init__(self, cfg: LDMBertConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LDMBertEncoder(cfg)

    @property
    def width(self) -> int:
        return self.cfg.d_model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> text states psi(P) (B, 77, d_model)."""
        if ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"LDMBert takes at most {self.cfg.max_position_embeddings} tokens, got {ids.shape[1]}")
        return self.model(ids)
