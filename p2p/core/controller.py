"""The controller contract between the sampling loop and the attention layers (paper Algorithm 1).

A controller is a plain object passed to `Pipeline.denoise` (and from there to every UNet call). The
pipeline *tells* it everything about where sampling stands; it never counts calls to find out:

    begin_sampling(num_steps)           once, before the first step: N, the number of DDIM steps
    begin_step(step, t, layout)         before every UNet call: step index i, timestep t, which rows of
                                        the batch are the unconditional and the conditional branch
    wants(site, hw) -> bool             per attention site and call: should M be computed for my edit?
    edit(M, site, hw) -> M              M of the conditional rows only, (B, heads, queries, keys)
    end_step(step, z_t) -> z_t          after each DDIM step: may rewrite the latents (local blend)

A subclass writes `wants` and `edit`, the math on the conditional maps. The base class does the
plumbing the UNet sees (`wants_map`, `on_map`): it asks `wants` only on calls that carry conditional
rows (in low-memory mode the unconditional branch is a call of its own), hands `edit` those rows, and
puts the result back into a new tensor: the unconditional branch of classifier-free guidance is never
touched (as the authors' code) and the caller's M is never modified in place.

M arrives in the dtype the model runs in (float16 on a GPU by default). A controller whose math needs
more precision (a temperature, a sum over many tokens) sets `fp32 = True`: `edit` then receives M in
float32 and its result is cast back.

Controllers combine with `Compose(a, b, ...)`: every one is told the steps, each edits the maps the
previous ones produced, and each rewrites the latents in turn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.attention import Site
from models.errors import UserError

Window = tuple[float, float]


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


def as_window(value: float | Window, what: str) -> Window:
    """A fraction f means the window (0, f) of the steps; every bound must lie in [0, 1]."""
    try:
        start, end = (0.0, value) if isinstance(value, (int, float)) else tuple(value)
        ok = 0 <= float(start) <= float(end) <= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{what} must be a fraction of the steps in [0, 1] or a window (start, end) with "
                        f"0 <= start <= end <= 1, got {value!r}")
    return float(start), float(end)


def step_range(window: float | Window, num_steps: int, *, what: str = "window",
               cross_attention: bool = False) -> tuple[int, int]:
    """The steps `lo <= step < hi` a window of fractions covers: the one place fractions become steps.

    The authors' two roundings are kept, because published settings depend on them: windows of
    self-attention injection, of local blending and of every other schedule cover int(a N) .. int(b N);
    the cross-attention schedule (`cross_attention=True`) covers int(a (N + 1)) .. int(b (N + 1)), as
    their `get_time_words_attention_alpha` builds N + 1 rows (so tau = 0.8 of 50 steps is 40 steps).
    """
    start, end = as_window(window, what)
    n = num_steps + 1 if cross_attention else num_steps
    return int(start * n), int(end * n)


class Controller:
    """Base controller: asks for no site and changes nothing (plain generation, bit for bit).

    Subclasses override `wants` and `edit` (and `end_step` to change latents). They may read
    `self.step`, `self.t`, `self.num_steps` and `self.layout`, and use `self.during(window)`.
    """

    step: int = 0
    t: int = 0
    num_steps: int | None = None
    layout: GuidanceLayout | None = None
    fp32: bool = False  # True: `edit` receives M in float32 (cast back to the run dtype afterwards)

    # --- told by the pipeline --------------------------------------------------------------------

    def begin_sampling(self, num_steps: int) -> None:
        """Called once before the first step with the number of DDIM steps N."""
        self.num_steps = num_steps

    def begin_step(self, step: int, t: int, layout: GuidanceLayout) -> None:
        """Called before every UNet call of step `step` (two calls per step in low-memory mode)."""
        self.step, self.t, self.layout = step, t, layout

    def end_step(self, step: int, z_t: torch.Tensor) -> torch.Tensor:
        """Called with the latents after the DDIM step of `step`; returns the latents to continue from."""
        return z_t

    # --- what a subclass writes --------------------------------------------------------------------

    def wants(self, site: Site, hw: tuple[int, int]) -> bool:
        """Whether to compute M at this site in this call; hw is the (h, w) grid of the queries."""
        return False

    def edit(self, M: torch.Tensor, site: Site, hw: tuple[int, int]) -> torch.Tensor:
        """The conditional rows' maps (B, heads, h*w, keys) -> maps of the same shape. Return M itself to
        only read it (nothing is then copied)."""
        return M

    def during(self, window: float | Window) -> bool:
        """Whether the current step lies in a window of fractions of the steps (`step_range`'s rounding)."""
        if self.num_steps is None:
            raise RuntimeError(f"{type(self).__name__} was not told the number of steps: run it through "
                               "Pipeline.denoise, or call begin_sampling(num_steps) first")
        lo, hi = step_range(window, self.num_steps)
        return lo <= self.step < hi

    # --- what the UNet calls (models/attention.py) ------------------------------------------------------

    def wants_map(self, site: Site, hw: tuple[int, int]) -> bool:
        return self.layout is not None and self.layout.cond is not None and self.wants(site, hw)

    def on_map(self, M: torch.Tensor, site: Site, hw: tuple[int, int]) -> torch.Tensor:
        rows = self.layout.cond
        given = M[rows].float() if self.fp32 else M[rows]
        new = self.edit(given, site, hw)
        if new is given:  # read only: nothing to copy
            return M
        return torch.cat([M[: rows.start], new.to(M.dtype), M[rows.stop:]])


class Compose(Controller):
    """Several controllers as one: all are told the steps; at a site each one that wants it edits the
    maps the previous ones returned; after a step each rewrites the latents in turn (in the given order)."""

    def __init__(self, *controllers: Controller | None):
        self.controllers = [c for c in controllers if c is not None]

    def begin_sampling(self, num_steps):
        super().begin_sampling(num_steps)
        for c in self.controllers:
            c.begin_sampling(num_steps)

    def begin_step(self, step, t, layout):
        super().begin_step(step, t, layout)
        for c in self.controllers:
            c.begin_step(step, t, layout)

    def wants_map(self, site, hw):
        return any(c.wants_map(site, hw) for c in self.controllers)

    def on_map(self, M, site, hw):
        for c in self.controllers:
            if c.wants_map(site, hw):
                M = c.on_map(M, site, hw)
        return M

    def end_step(self, step, z_t):
        for c in self.controllers:
            z_t = c.end_step(step, z_t)
        return z_t
