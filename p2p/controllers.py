"""The controller contract between the sampling loop and the attention layers.

A controller is a plain object passed to `Pipeline.denoise` (and from there to every UNet call).
The pipeline tells it, before each UNet call, the step index, the timestep and the guidance layout
of the batch (which rows are the unconditional branch, which the conditional one); the controller
never counts calls to find out. After each DDIM step it may rewrite the latents (local blending).
The UNet asks it, per attention site, whether it `wants` the map M; only those maps are computed
explicitly and passed to `__call__`.
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


class Controller:
    """Base controller: asks for no site and changes nothing (plain generation, bit for bit)."""

    step: int = 0
    t: int = 0
    layout: GuidanceLayout | None = None

    def begin_step(self, step: int, t: int, layout: GuidanceLayout) -> None:
        """Called before every UNet call of step `step` (two calls per step in low-memory mode)."""
        self.step, self.t, self.layout = step, t, layout

    def wants(self, site: Site) -> bool:
        return False

    def __call__(self, M: torch.Tensor, site: Site, hw: tuple[int, int]) -> torch.Tensor:
        return M

    def end_step(self, step: int, z_t: torch.Tensor) -> torch.Tensor:
        """Called with the latents after the DDIM step of `step`; returns the latents to continue from."""
        return z_t
