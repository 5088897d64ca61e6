"""Local editing: keep everything outside the edited object equal to the source (Sec. 3.2, "Local editing").

For words w of the source and w* of an edited prompt, the cross-attention maps of their tokens,
averaged over the steps so far, over the 16 x 16 layers and their heads, give a soft mask per prompt;
max-pooled (3 x 3), upsampled to the latent grid, normalised by its maximum and thresholded at k = 0.3.
The union with the source's mask is alpha (the shape may change), and after each DDIM step

    z*_{t-1} <- z_{t-1} + alpha * (z*_{t-1} - z_{t-1})

so that outside alpha the edited latent equals the source latent exactly. As the authors' null-text
variant, blending may start late (`start`) and a second set of words can be cut out of the mask.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .controllers import AttentionStore, SiteSelection


def word_weights(tokenizer, prompts: list[str], words, what: str) -> torch.Tensor:
    """(B, 77): 1 at the tokens of the chosen words in each prompt.

    `words` is either one list of words, each used in every prompt that contains it (a word that is in
    no prompt is an error), or one list of words per prompt.
    """
    per_prompt = isinstance(words[0], (list, tuple)) if words else False
    alpha = torch.zeros(len(prompts), 77)
    if per_prompt:
        if len(words) != len(prompts):
            raise ValueError(f"{what}: {len(words)} word lists for {len(prompts)} prompts")
        for b, (p, ws) in enumerate(zip(prompts, words)):
            for w in ws:
                alpha[b, tokenizer.word_token_indices(p, w)] = 1  # raises, naming the word and prompt
        return alpha
    for w in words:
        hits = 0
        for b, p in enumerate(prompts):
            try:
                alpha[b, tokenizer.word_token_indices(p, w)] = 1
                hits += 1
            except ValueError:
                pass
        if not hits:
            raise ValueError(f"{what} word {w!r} is in none of the prompts: " + "; ".join(repr(p) for p in prompts))
    return alpha


class LocalBlend:
    """Blends every edited latent back to the source's outside a mask derived from attention maps."""

    def __init__(self, tokenizer, prompts: list[str], words: Sequence, steps: int, *,
                 subtract: Sequence = (), threshold: float = 0.3, subtract_threshold: float = 0.3,
                 start: float = 0.0, res: int = 16):
        for name, v in (("threshold", threshold), ("subtract_threshold", subtract_threshold), ("start", start)):
            if not 0 <= v <= 1:
                raise ValueError(f"local blend {name} must be in [0, 1], got {v}")
        if not words:
            raise ValueError("local blend needs at least one word")
        self.alpha = word_weights(tokenizer, prompts, words, "local blend")
        self.sub = word_weights(tokenizer, prompts, subtract, "local blend subtract") if subtract else None
        self.threshold, self.subtract_threshold = threshold, subtract_threshold
        self.start = int(start * steps)
        # the maps it needs: cross-attention at the blend resolution, all steps, every place
        self.store = AttentionStore(SiteSelection(res=(res,)), kinds=("cross",), max_queries=math.inf)
        self.res = res

    def mask(self, latent_hw: tuple[int, int]) -> torch.Tensor:
        """alpha (B, 1, h, w) in {0, 1}: the union of each prompt's mask with the source's."""
        sites = self.store.select("cross", self.res)
        if not sites:
            raise ValueError(f"local blend found no cross-attention maps at res {self.res}; "
                             "this model has none at that resolution")
        maps = torch.stack([self.store.average(s) for s in sites])  # (layers, B, h, w, 77)
        add = self._mask(maps, self.alpha, latent_hw, pool=True, threshold=self.threshold)
        if self.sub is not None:
            add = add & ~self._mask(maps, self.sub, latent_hw, pool=False, threshold=self.subtract_threshold)
        return add.float()

    @staticmethod
    def _mask(maps, weights, latent_hw, pool, threshold):
        m = (maps * weights.to(maps)[None, :, None, None, :]).sum(-1).mean(0)[:, None]  # (B, 1, h, w)
        if pool:
            m = F.max_pool2d(m, 3, stride=1, padding=1)
        m = F.interpolate(m, size=latent_hw, mode="nearest")
        m = m / m.amax(dim=(2, 3), keepdim=True).clamp_min(1e-12)
        m = m > threshold
        return m[:1] | m

    def __call__(self, step: int, z_t: torch.Tensor) -> torch.Tensor:
        if step < self.start:
            return z_t
        alpha = self.mask(tuple(z_t.shape[-2:])).to(z_t)
        return z_t[:1] + alpha * (z_t - z_t[:1])
