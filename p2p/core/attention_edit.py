"""Prompt-to-Prompt's edit functions and the controller that applies them (Hertz et al. 2023, Sec. 3.2).

The batch holds the source prompt P (row 0) and edited prompts P*_1..P*_T, all from the same z_T.
At every step t, for every cross-attention site and every edited prompt b (Algorithm 1):

    M_hat_b = s_{b,t,j} * Edit(M_src, M*_b)[..., j] + (1 - s_{b,t,j}) * M*_b[..., j]

where s is the injection `schedule` (1 while step t is inside the window tau of token j's word, 0
after), and Edit is one of
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

from .align import word_occurrences
from .controller import Controller, Window, step_range
from .sites import ALL_SITES, SiteSelection


def cross_schedule(tokenizer, prompts: list[str], steps: int, cross_replace) -> torch.Tensor:
    """The injection schedule (steps, T, 77): 1 where target token j of edit b takes the injected map at a step.

    `cross_replace` is a fraction tau, a window (start, end), or a dict of them per word of the edited
    prompts with a "default_" entry for the other tokens (the authors' format, e.g.
    {"default_": 1.0, "lion": 0.4}). Windows are rounded as the authors' (`step_range`, cross_attention=True).
    """
    per_word = dict(cross_replace) if isinstance(cross_replace, dict) else {"default_": cross_replace}
    per_word.setdefault("default_", 1.0)
    T = len(prompts) - 1
    schedule = torch.zeros(steps, T, 77)

    def fill(window, b, tokens):
        lo, hi = step_range(window, steps, what="cross_replace", cross_attention=True)
        schedule[:, b, tokens] = 0
        schedule[lo:hi, b, tokens] = 1

    for b in range(T):
        fill(per_word["default_"], b, slice(None))
    for word, window in per_word.items():
        if word != "default_":
            for b, tokens in word_occurrences(tokenizer, prompts[1:], word, "cross_replace"):
                fill(window, b, tokens)
    return schedule


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

    def __init__(self, mappers: torch.Tensor, aligned: torch.Tensor):
        self.mappers, self.aligned = mappers, aligned  # aligned (T, 77): 1 where target token j has a source token

    def __call__(self, base, rep):
        moved = base[:, :, self.mappers.to(base.device)].permute(2, 0, 1, 3)  # (T, heads, N, 77)
        a = self.aligned.to(base)[:, None, None, :]
        return moved * a + rep * (1 - a)


class Reweight:
    """Scale chosen tokens' maps by c (T, 77), on top of a previous edit or of the source maps.

    Post-softmax and not renormalised, as the paper (c in [-2, 2], and beyond)."""

    def __init__(self, equalizer: torch.Tensor, previous: CrossEdit | None = None):
        self.equalizer, self.previous = equalizer, previous

    def __call__(self, base, rep):
        edited = self.previous(base, rep) if self.previous else base.expand_as(rep)
        return edited * self.equalizer.to(base)[:, None, None, :]


class AttentionEdit(Controller):
    """Injects the source's attention into prompts[1:]: cross-attention through an edit function on the
    schedule's steps and `cross_sites`, self-attention on the `self_steps` window and `self_sites`."""

    def __init__(self, edit: CrossEdit, schedule: torch.Tensor, self_window: float | Window, *,
                 cross_sites: SiteSelection = ALL_SITES, self_sites: SiteSelection = SiteSelection(max_res=16)):
        self.function, self.schedule = edit, schedule
        self.self_steps = step_range(self_window, schedule.shape[0], what="self_replace")
        self.cross_sites, self.self_sites = cross_sites, self_sites

    def begin_sampling(self, num_steps):
        if num_steps != self.schedule.shape[0]:
            raise ValueError(f"this edit was built for {self.schedule.shape[0]} steps; the sampler runs {num_steps}")
        super().begin_sampling(num_steps)

    def begin_step(self, step, t, layout):
        if layout.prompts != self.schedule.shape[1] + 1:
            raise ValueError(f"this edit was built for {self.schedule.shape[1] + 1} prompts, the batch has "
                             f"{layout.prompts}")
        super().begin_step(step, t, layout)

    def wants(self, site: Site, hw) -> bool:
        """Whether the source's map is injected at this site in this step."""
        if site.is_cross:
            return self.cross_sites.selects(site, hw) and bool(self.schedule[self.step].any())
        return self.self_sites.selects(site, hw) and self.self_steps[0] <= self.step < self.self_steps[1]

    def edit(self, M, site, hw):
        base, rep = M[0], M[1:]  # (heads, N, keys), (T, heads, N, keys)
        if site.is_cross:
            s = self.schedule[self.step].to(rep)[:, None, None, :]
            new = self.function(base, rep) * s + rep * (1 - s)
        else:
            new = base.expand_as(rep)
        return torch.cat([base[None], new.to(M.dtype)])
