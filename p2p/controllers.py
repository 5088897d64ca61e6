"""The controller contract between the sampling loop and the attention layers, and the attention store.

A controller is a plain object passed to `Pipeline.denoise` (and from there to every UNet call).
The pipeline tells it, before each UNet call, the step index, the timestep and the guidance layout
of the batch (which rows are the unconditional branch, which the conditional one); the controller
never counts calls to find out. After each DDIM step it may rewrite the latents (local blending).
The UNet asks it, per attention site and call, whether it `wants` the map M; only those maps are
computed explicitly and passed to `__call__`. Controllers read and edit the conditional rows only:
the unconditional branch of classifier-free guidance is never touched (as the authors' code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention import Site


@dataclass(frozen=True)
class GuidanceLayout:
    """Rows of one UNet call's batch. Batched guidance: [uncond x B | cond x B]; low-memory mode runs
    the two branches as separate calls, each with one of the slices set and the other None."""

    prompts: int  # B, the number of prompts (prompt 0 is the source of an edit)
    uncond: slice | None
    cond: slice | None

    @staticmethod
    def batched(b: int) -> GuidanceLayout:
        return GuidanceLayout(b, slice(0, b), slice(b, 2 * b))


def with_rows(M: torch.Tensor, rows: slice, new: torch.Tensor) -> torch.Tensor:
    """M with its rows `rows` replaced by `new`, as a new tensor (M itself is left alone)."""
    return torch.cat([M[: rows.start], new.to(M.dtype), M[rows.stop:]])


class Controller:
    """Base controller: asks for no site and changes nothing (plain generation, bit for bit)."""

    step: int = 0
    t: int = 0
    layout: GuidanceLayout | None = None

    def begin_step(self, step: int, t: int, layout: GuidanceLayout) -> None:
        """Called before every UNet call of step `step` (two calls per step in low-memory mode)."""
        self.step, self.t, self.layout = step, t, layout

    def wants(self, site: Site, hw: tuple[int, int]) -> bool:
        return False

    def __call__(self, M: torch.Tensor, site: Site, hw: tuple[int, int]) -> torch.Tensor:
        return M

    def end_step(self, step: int, z_t: torch.Tensor) -> torch.Tensor:
        """Called with the latents after the DDIM step of `step`; returns the latents to continue from."""
        return z_t


@dataclass(frozen=True)
class SiteSelection:
    """A set of attention sites, for ablations: by place, native resolution and transformer block.

    `res` are sides of the attention grid at the model's native size (SD v1: 64, 32, 16, 8);
    `blocks` index the transformer blocks in forward order (SD v1: 0..15, mid = 6). None = all.
    """

    places: tuple[str, ...] = ("down", "mid", "up")
    res: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None

    def __contains__(self, site: Site) -> bool:
        return (site.place in self.places and (self.res is None or site.res in self.res)
                and (self.blocks is None or site.block in self.blocks))


ALL_SITES = SiteSelection()


class AttentionStore(Controller):
    """Average over steps of the head-averaged maps of chosen sites, conditional rows only.

    For each site it keeps one running sum of shape (B, queries, keys), so memory does not grow with
    the number of steps. Defaults follow the authors: cross and self maps of every layer with at most
    32 x 32 queries (the 64 x 64 layers are skipped), every step.
    """

    def __init__(self, sites: SiteSelection = ALL_SITES, kinds=("cross", "self"), max_queries: float = 32 ** 2,
                 steps: tuple[int, int] | None = None):
        self.sites, self.kinds, self.max_queries, self.steps = sites, tuple(kinds), max_queries, steps
        self.sums: dict[Site, torch.Tensor] = {}
        self.counts: dict[Site, int] = {}
        self.sizes: dict[Site, tuple[int, int]] = {}

    def wants(self, site, hw):
        return (self.layout is not None and self.layout.cond is not None and site.kind in self.kinds
                and site in self.sites and hw[0] * hw[1] <= self.max_queries
                and (self.steps is None or self.steps[0] <= self.step < self.steps[1]))

    def __call__(self, M, site, hw):
        self.add(M[self.layout.cond], site, hw)
        return M

    def add(self, M_cond: torch.Tensor, site: Site, hw: tuple[int, int]) -> None:
        """Accumulate the conditional rows (B, heads, queries, keys) of one site at the current step."""
        m = M_cond.to(torch.promote_types(M_cond.dtype, torch.float32)).mean(dim=1)  # (B, queries, keys)
        self.sums[site] = self.sums[site] + m if site in self.sums else m
        self.counts[site] = self.counts.get(site, 0) + 1
        self.sizes[site] = hw

    def average(self, site: Site) -> torch.Tensor:
        """The site's map averaged over steps and heads, (B, h, w, keys)."""
        h, w = self.sizes[site]
        m = self.sums[site] / self.counts[site]
        return m.reshape(m.shape[0], h, w, m.shape[-1])

    def select(self, kind: str = "cross", res: int | tuple[int, ...] | None = None,
               places: tuple[str, ...] = ("down", "mid", "up")) -> list[Site]:
        res = (res,) if isinstance(res, int) else res
        return [s for s in self.sums if s.kind == kind and s.place in places and (res is None or s.res in res)]

    def aggregate(self, kind: str = "cross", res: int | tuple[int, ...] | None = 16,
                  places: tuple[str, ...] = ("up", "down")) -> torch.Tensor:
        """Mean over the chosen sites (same grid size) of their step- and head-averaged maps, (B, h, w, keys).

        The authors' `aggregate_attention` with `res=16, from_where=("up", "down")` is the default.
        """
        sites = self.select(kind, res, places)
        if not sites:
            have = sorted({(s.kind, s.res, s.place) for s in self.sums})
            raise ValueError(f"no stored {kind}-attention maps at res {res} in {places}; stored: {have}")
        sizes = {self.sizes[s] for s in sites}
        if len(sizes) > 1:
            raise ValueError(f"the chosen sites have different grid sizes {sorted(sizes)}; choose one res")
        return torch.stack([self.average(s) for s in sites]).mean(dim=0)

    def reset(self) -> None:
        self.sums, self.counts, self.sizes = {}, {}, {}
