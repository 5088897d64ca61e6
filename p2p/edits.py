"""Prompt-to-Prompt edit functions and the controller that applies them (Hertz et al. 2023, Sec. 3.2).

The batch holds the source prompt P (row 0) and edited prompts P*_1..P*_T, all from the same z_T.
At every step t, for every cross-attention site and every edited prompt b (Algorithm 1):

    M_hat_b = alpha_{b,t,j} * Edit(M_src, M*_b)[..., j] + (1 - alpha_{b,t,j}) * M*_b[..., j]

where alpha is the injection schedule (1 while step t is inside the window tau of token j's word,
0 after), and Edit is one of
    Replace  (word swap):     Edit = M_src @ A_b, A_b a (77 x 77) token mapper          (Sec. 3.2)
    Refine   (added words):   Edit_j = M_src[..., m_b(j)] where j is aligned, else M*_b[..., j]
    Reweight (fader):         Edit_j = c_j * Edit'(M_src, M*_b)_j, Edit' a previous edit or M_src
Self-attention maps of the edited prompts are replaced by the source's during a window of steps, on
layers with at most 16 x 16 keys (the authors' choice). Only the conditional branch is edited.
"""
from __future__ import annotations

from typing import Protocol

import torch

from models.attention import Site

from .controllers import ALL_SITES, AttentionStore, Controller, SiteSelection, with_rows

Window = tuple[float, float]


def as_window(value: float | Window, what: str) -> Window:
    """A fraction f means the window (0, f) of the steps; every bound must lie in [0, 1]."""
    start, end = (0.0, value) if isinstance(value, (int, float)) else tuple(value)
    if not (0 <= start <= end <= 1):
        raise ValueError(f"{what} must be a fraction of the steps in [0, 1] or a window (start, end) with "
                         f"0 <= start <= end <= 1, got {value!r}")
    return float(start), float(end)


def cross_schedule(tokenizer, prompts: list[str], steps: int, cross_replace) -> torch.Tensor:
    """alpha (steps, T, 77): 1 where target token j of edit b takes the edited (injected) map at a step.

    `cross_replace` is a fraction tau, a window (start, end), or a dict of them per word of the edited
    prompts with a "default_" entry for the other tokens (the authors' format, e.g.
    {"default_": 1.0, "lion": 0.4}). As the authors: a window (a, b) covers steps int(a(N+1))..int(b(N+1))-1.
    """
    per_word = dict(cross_replace) if isinstance(cross_replace, dict) else {"default_": cross_replace}
    per_word.setdefault("default_", 1.0)
    T = len(prompts) - 1
    alpha = torch.zeros(steps, T, 77)

    def fill(window, b, tokens):
        start, end = as_window(window, "cross_replace")
        start, end = int(start * (steps + 1)), int(end * (steps + 1))
        alpha[:, b, tokens] = 0
        alpha[start:end, b, tokens] = 1

    for b in range(T):
        fill(per_word["default_"], b, slice(None))
    for word, window in per_word.items():
        if word == "default_":
            continue
        found = False
        for b, p in enumerate(prompts[1:]):
            try:
                fill(window, b, tokenizer.word_token_indices(p, word))
                found = True
            except ValueError:
                pass
        if not found:
            raise ValueError(f"cross_replace names the word {word!r}, which is in none of the edited prompts "
                             f"{prompts[1:]}")
    return alpha


def self_window(steps: int, self_replace: float | Window) -> tuple[int, int]:
    """Steps int(a N) <= step < int(b N) inject the source's self-attention (the authors' rounding)."""
    start, end = as_window(self_replace, "self_replace")
    return int(start * steps), int(end * steps)


class CrossEdit(Protocol):
    def __call__(self, base: torch.Tensor, rep: torch.Tensor) -> torch.Tensor:
        """base: source maps (heads, N, 77); rep: edited prompts' maps (T, heads, N, 77) -> (T, heads, N, 77)."""


class Replace:
    """Word swap: the source maps carried to the target's token positions by a mapper A (T, 77, 77)."""

    def __init__(self, mappers: torch.Tensor):
        self.A = mappers

    def __call__(self, base, rep):
        return torch.einsum("hnw,twk->thnk", base, self.A.to(base))


class Refine:
    """Added words: aligned tokens take the source map, inserted tokens keep their own."""

    def __init__(self, mappers: torch.Tensor, alphas: torch.Tensor):
        self.mappers, self.alphas = mappers, alphas

    def __call__(self, base, rep):
        moved = base[:, :, self.mappers.to(base.device)].permute(2, 0, 1, 3)  # (T, heads, N, 77)
        a = self.alphas.to(base)[:, None, None, :]
        return moved * a + rep * (1 - a)


class Reweight:
    """Scale chosen tokens' maps by c (T, 77), on top of a previous edit or of the source maps.

    Post-softmax and not renormalised, as the paper (c in [-2, 2], and beyond)."""

    def __init__(self, equalizer: torch.Tensor, previous: CrossEdit | None = None):
        self.equalizer, self.previous = equalizer, previous

    def __call__(self, base, rep):
        edited = self.previous(base, rep) if self.previous else base.expand_as(rep)
        return edited * self.equalizer.to(base)[:, None, None, :]


class Edit(Controller):
    """Applies a cross-attention edit and self-attention injection to prompts[1:] from prompts[0].

    `cross_sites` / `self_sites` restrict where maps are injected (ablations); `self_max_keys` is the
    authors' cap on self-injection (math.inf: no cap). `blend` (a LocalBlend) rewrites the latents after
    each step; `store` (an AttentionStore) records the maps as used, edits included.
    """

    def __init__(self, edit: CrossEdit, cross_alpha: torch.Tensor, self_steps: tuple[int, int], *,
                 cross_sites: SiteSelection = ALL_SITES, self_sites: SiteSelection = ALL_SITES,
                 self_max_keys: float = 16 ** 2, blend=None, store: AttentionStore | None = None):
        self.edit, self.alpha, self.self_steps = edit, cross_alpha, self_steps
        self.cross_sites, self.self_sites, self.self_max_keys = cross_sites, self_sites, self_max_keys
        self.blend = blend
        self.stores = [s for s in (store, blend.store if blend else None) if s is not None]

    @property
    def steps(self) -> int:
        return self.alpha.shape[0]

    def begin_step(self, step, t, layout):
        if step >= self.steps:
            raise ValueError(f"this edit was built for {self.steps} steps; the sampler is at step {step}")
        if layout.prompts != self.alpha.shape[1] + 1:
            raise ValueError(f"this edit was built for {self.alpha.shape[1] + 1} prompts, the batch has {layout.prompts}")
        super().begin_step(step, t, layout)
        for s in self.stores:
            s.begin_step(step, t, layout)

    def edits(self, site: Site, hw) -> bool:
        if site.is_cross:
            return site in self.cross_sites and bool(self.alpha[self.step].any())
        return (site in self.self_sites and self.self_steps[0] <= self.step < self.self_steps[1]
                and hw[0] * hw[1] <= self.self_max_keys)

    def wants(self, site, hw):
        if self.layout is None or self.layout.cond is None:
            return False
        return self.edits(site, hw) or any(s.wants(site, hw) for s in self.stores)

    def __call__(self, M, site, hw):
        cond = M[self.layout.cond]  # (B, heads, N, keys)
        edited = self.edits(site, hw)
        if edited:
            base, rep = cond[0], cond[1:]
            if site.is_cross:
                a = self.alpha[self.step].to(rep)[:, None, None, :]
                new = self.edit(base, rep) * a + rep * (1 - a)
            else:
                new = base.expand_as(rep)
            cond = torch.cat([base[None], new.to(cond.dtype)])
        for s in self.stores:
            if s.wants(site, hw):
                s.add(cond, site, hw)
        return with_rows(M, self.layout.cond, cond) if edited else M

    def end_step(self, step, z_t):
        return self.blend(step, z_t) if self.blend else z_t
