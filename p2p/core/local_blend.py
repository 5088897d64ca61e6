"""Local editing: keep everything outside the edited object equal to the source (Sec. 3.2, "Local editing").

For words w of the source and w* of an edited prompt, the cross-attention maps of their tokens,
averaged over the steps so far, over the 16 x 16 layers and their heads, give a soft mask per prompt;
max-pooled (3 x 3), upsampled to the latent grid, normalised by its maximum and thresholded at k = 0.3
(strictly: a cell is in the mask when its value is > k). The union with the source's mask is alpha
(the shape may change), and after each DDIM step

    z*_{t-1} <- z_{t-1} + alpha * (z*_{t-1} - z_{t-1})

so that outside alpha the edited latent equals the source latent exactly. As the authors' null-text
variant, blending may start late (`start`) and a second set of words can be cut out of the mask.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from models.errors import UserError

from .align import word_occurrences
from .sites import SiteSelection
from .store import AttentionStore

MIN_SIDE = 3  # on a grid of side <= 2 the 3x3 max-pool spreads every map's maximum over the whole grid


def word_mask(tokenizer, prompts: list[str], words, what: str) -> torch.Tensor:
    """(B, 77): 1 at the tokens of the chosen words in each prompt.

    `words` is either one list of words, each used in every prompt that contains it (a word that is in
    no prompt is an error), or one list of words per prompt.
    """
    per_prompt = isinstance(words[0], (list, tuple)) if words else False
    mask = torch.zeros(len(prompts), 77)
    if per_prompt:
        if len(words) != len(prompts):
            raise UserError(f"{what}: {len(words)} word lists for {len(prompts)} prompts")
        for b, (p, ws) in enumerate(zip(prompts, words)):
            for w in ws:
                mask[b, tokenizer.word_token_indices(p, w)] = 1  # raises, naming the word and prompt
        return mask
    for w in words:
        for b, tokens in word_occurrences(tokenizer, prompts, w, what):
            mask[b, tokens] = 1
    return mask


class LocalBlend(AttentionStore):
    """Blends every edited latent back to the source's outside a mask made from attention maps.

    It is an attention store of the maps the mask needs (cross-attention at `sites`, default the 16x16
    maps of SD v1, every step), and a controller whose `end_step` blends the latents.
    """

    def __init__(self, tokenizer, prompts: list[str], words: Sequence, *, subtract: Sequence = (),
                 threshold: float = 0.3, subtract_threshold: float = 0.3, start: float = 0.0,
                 sites: SiteSelection = SiteSelection(kinds=("cross",), res=(16,))):
        for name, v in (("threshold", threshold), ("subtract_threshold", subtract_threshold), ("start", start)):
            if not 0 <= v <= 1:
                raise UserError(f"local blend {name} must be in [0, 1], got {v}")
        if not words:
            raise UserError("local blend needs at least one word")
        if sites.kinds != ("cross",):
            raise UserError(f"local blend reads cross-attention maps; its sites must have kinds=('cross',), got "
                            f"{sites.kinds}")
        super().__init__(sites)
        self.words = word_mask(tokenizer, prompts, words, "local blend")
        self.sub = word_mask(tokenizer, prompts, subtract, "local blend subtract") if subtract else None
        self.threshold, self.subtract_threshold, self.start = threshold, subtract_threshold, start

    def mask(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """alpha (B, 1, h, w) in {0, 1}: the union of each prompt's mask with the source's."""
        sites = self.select("cross", self.sites)
        if not sites:
            raise UserError(f"local blend found no cross-attention maps {self.sites.describe()}: this model has "
                            "none there; choose other blend sites (blend_sites=SiteSelection(kinds=('cross',), res=...))")
        grids = sorted({tuple(self.sizes[s]) for s in sites})
        if len(grids) > 1:
            raise UserError("local blend averages maps of one grid; its sites hold " + ", ".join(f"{h}x{w}" for h, w in grids)
                            + ": choose one resolution (blend_sites=SiteSelection(kinds=('cross',), res=(R,)))")
        side = min(grids[0])
        if side < MIN_SIDE:
            raise UserError(f"local blend from {side}x{side} attention maps cannot work: the 3x3 max-pool spreads "
                            "each word's peak over the whole grid, so the mask would cover everything and nothing "
                            "of the source would be kept; blend from larger maps (a larger res, or a larger image)")
        maps = torch.stack([self.average(s) for s in sites])  # (layers, B, h, w, 77)
        add = threshold_mask(maps, self.words, latent_hw, pool=True, threshold=self.threshold)
        if self.sub is not None:
            add = add & ~threshold_mask(maps, self.sub, latent_hw, pool=False, threshold=self.subtract_threshold)
        return add.float()

    def end_step(self, step: int, z_t: torch.Tensor) -> torch.Tensor:
        if not self.during((self.start, 1.0)):
            return z_t
        alpha = self.mask(tuple(z_t.shape[-2:])).to(z_t)
        return z_t[:1] + alpha * (z_t - z_t[:1])


def threshold_mask(maps: torch.Tensor, words: torch.Tensor, latent_hw, pool: bool, threshold: float) -> torch.Tensor:
    """maps (layers, B, h, w, 77), words (B, 77) -> the boolean mask (B, 1, *latent_hw), the source's OR'd in."""
    m = (maps * words.to(maps)[None, :, None, None, :]).sum(-1).mean(0)[:, None]  # (B, 1, h, w)
    if pool:
        m = F.max_pool2d(m, 3, stride=1, padding=1)
    m = F.interpolate(m, size=latent_hw, mode="nearest")
    m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
    m = m > threshold
    return m[:1] | m
