"""The attention store: cross- and self-attention maps averaged over steps and heads (paper Sec. 3.1, Fig. 4).

A token's cross-attention map, averaged over the steps and over the 16 x 16 layers, already outlines
where its object will be; the authors' `AttentionStore` keeps these averages, and local blending and
every attention-map figure read them. Ours is a controller that only reads (`edit` returns M itself).
"""
from __future__ import annotations

import torch

from models.attention import Site
from models.errors import UserError

from .controller import Controller, Window, as_window
from .sites import SiteSelection

AUTHORS_MAPS = SiteSelection(res=(16,), places=("up", "down"))  # their `aggregate_attention(res=16, ("up", "down"))`


class AttentionStore(Controller):
    """Running sums of the head-averaged maps of the chosen sites, conditional rows only.

    For each site it keeps one sum of shape (B, queries, keys), so memory does not grow with the number of
    steps. The authors' choice is every layer with at most 32 x 32 queries (`SiteSelection(max_res=32)`, the
    default here; `Pipeline.attention_store()` gives the model's), every step; `window` restricts the steps
    to a window of fractions (start, end).
    """

    def __init__(self, sites: SiteSelection = SiteSelection(max_res=32), window: float | Window | None = None):
        self.sites = sites
        self.window = None if window is None else as_window(window, "the attention store's window")
        self.sums: dict[Site, torch.Tensor] = {}
        self.counts: dict[Site, int] = {}
        self.sizes: dict[Site, tuple[int, int]] = {}

    def wants(self, site, hw):
        return self.sites.selects(site, hw) and (self.window is None or self.during(self.window))

    def edit(self, M, site, hw):
        """Accumulate the conditional rows (B, heads, queries, keys) of one site at the current step."""
        m = M.to(torch.promote_types(M.dtype, torch.float32)).mean(dim=1)  # (B, queries, keys)
        self.sums[site] = self.sums[site] + m if site in self.sums else m
        self.counts[site] = self.counts.get(site, 0) + 1
        self.sizes[site] = hw
        return M

    def average(self, site: Site) -> torch.Tensor:
        """The site's map averaged over steps and heads, (B, h, w, keys)."""
        h, w = self.sizes[site]
        m = self.sums[site] / self.counts[site]
        return m.reshape(m.shape[0], h, w, m.shape[-1])

    def select(self, kind: str = "cross", sites: SiteSelection = AUTHORS_MAPS) -> list[Site]:
        """The stored sites of one kind that `sites` selects."""
        return [s for s in self.sums if s.kind == kind and sites.selects(s, self.sizes[s])]

    def aggregate(self, kind: str = "cross", sites: SiteSelection = AUTHORS_MAPS) -> torch.Tensor:
        """Mean over the chosen sites (one grid size) of their step- and head-averaged maps, (B, h, w, keys).

        The default is the authors' `aggregate_attention(res=16, from_where=("up", "down"))`.
        """
        chosen = self.select(kind, sites)
        if not chosen:
            have = sorted({(s.kind, s.res, s.place) for s in self.sums})
            why = "nothing was stored: the store's window or sites left every call out" if not have else f"stored: {have}"
            raise UserError(f"no stored maps of {kind}-attention {sites.describe()}; {why}")
        sizes = {self.sizes[s] for s in chosen}
        if len(sizes) > 1:
            raise UserError(f"the chosen sites have different grid sizes {sorted(sizes)}; choose one res")
        return torch.stack([self.average(s) for s in chosen]).mean(dim=0)

    def reset(self) -> None:
        self.sums, self.counts, self.sizes = {}, {}, {}
