"""Attention maps as pictures: per-token cross-attention heatmaps and self-attention components.

The paper shows (Fig. 4) the cross-attention map of each token, averaged over steps and over the
16 x 16 layers and their heads: a token's map already outlines where its object will be. This module
turns an `AttentionStore` into such maps, overlays them on the image, and, for self-attention, shows
the leading principal components of the (h w x h w) map (the authors' `show_self_attention_comp`).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from p2p.files.output import grid

from .sites import SiteSelection
from .store import AUTHORS_MAPS, AttentionStore

SIDE = 256  # each tile of a sheet is SIDE x SIDE pixels


def token_maps(store: AttentionStore, tokenizer, prompt: str, prompt_index: int = 0,
               sites: SiteSelection = AUTHORS_MAPS) -> list[tuple[str, np.ndarray]]:
    """(token text, map (h, w) in [0, 1]) for BOS, every content token and EOS of `prompt`, averaged over
    the stored steps and the chosen sites (default: the 16x16 up and down layers, as the authors)."""
    maps = store.aggregate("cross", sites)[prompt_index]  # (h, w, 77)
    tokens = ["<bos>", *tokenizer.tokens(prompt), "<eos>"]
    out = []
    for i, text in enumerate(tokens):
        m = maps[..., i].float()
        out.append((text, (m / m.max().clamp_min(1e-12)).cpu().numpy()))
    return out


def heat_colors(m: np.ndarray) -> np.ndarray:
    """A map in [0, 1] (h, w) -> RGB uint8 (h, w, 3) on a blue-cyan-yellow-red scale ("jet"-like)."""
    m = np.clip(m, 0, 1)[..., None]
    r = np.clip(1.5 - np.abs(4 * m - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * m - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * m - 1), 0, 1)
    return (np.concatenate([r, g, b], axis=-1) * 255).astype(np.uint8)


def upsample(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map to (width, height), values kept in [0, 1]."""
    img = Image.fromarray((np.clip(m, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.resize(size, Image.BILINEAR), dtype=np.float32) / 255


def overlay(image: Image.Image, m: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """The heatmap of `m` blended over `image` (both at the image's size)."""
    heat = Image.fromarray(heat_colors(upsample(m, image.size)))
    return Image.blend(image.convert("RGB"), heat, opacity)


def token_sheet(image: Image.Image | None, maps: list[tuple[str, np.ndarray]], opacity: float = 0.5) -> Image.Image:
    """One tile per token, captioned with the token: the map over the image, or the map alone."""
    tiles = []
    for _, m in maps:
        if image is None:
            tiles.append(Image.fromarray(heat_colors(upsample(m, (SIDE, SIDE)))))
        else:
            tiles.append(overlay(image.resize((SIDE, SIDE)), m, opacity))
    return grid(tiles, [t for t, _ in maps])


def self_attention_components(store: AttentionStore, sites: SiteSelection = AUTHORS_MAPS, prompt_index: int = 0,
                              n: int = 10) -> list[np.ndarray]:
    """The first n right-singular vectors of the row-centred self-attention map, each as an (h, w) image
    normalised to [0, 1] (the authors' `show_self_attention_comp`)."""
    maps = store.aggregate("self", sites)[prompt_index]  # (h, w, h*w)
    h, w, _ = maps.shape
    a = maps.reshape(h * w, h * w).double()
    a = a - a.mean(dim=1, keepdim=True)
    _, _, vt = torch.linalg.svd(a, full_matrices=False)
    comps = []
    for v in vt[:n]:
        v = v.reshape(h, w)
        v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
        comps.append(v.float().cpu().numpy())
    return comps


def component_sheet(components: list[np.ndarray]) -> Image.Image:
    tiles = [Image.fromarray((upsample(c, (SIDE, SIDE)) * 255).astype(np.uint8)).convert("RGB") for c in components]
    return grid(tiles, [f"component {i}" for i in range(len(tiles))])
