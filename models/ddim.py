"""DDIM sampling (Song et al., ICLR 2021) with Stable Diffusion v1's noise schedule, or another one.

Forward process q(z_t | z_0) = N(sqrt(alpha_bar_t) z_0, (1 - alpha_bar_t) I), with the "scaled linear"
betas of SD v1: beta_t = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2 and alpha_bar_t = prod(1 - beta).

One DDIM step from t to t' = t - 1000 // N (DDIM Eq. 12), with eps = eps_theta(z_t, t):

    z0_hat = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    sigma  = eta * sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_t'))
    z_t'   = sqrt(alpha_bar_t') z0_hat + sqrt(1 - alpha_bar_t' - sigma^2) eps + sigma * noise

For the last step t' < 0 and alpha_bar_t' is alpha_bar_0 (`set_alpha_to_one = False`, as SD v1 ships)
or 1. The inverse step (z_t' -> z_t with eps predicted at t) is what DDIM inversion uses.

The network may predict v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) z_0 instead of eps (Salimans & Ho
2022; SD 2.x at 768 px). Then eps = sqrt(alpha_bar_t) v + sqrt(1 - alpha_bar_t) z_t and
z0_hat = sqrt(alpha_bar_t) z_t - sqrt(1 - alpha_bar_t) v, and the step above is unchanged. Guidance is linear in
the output, so guiding v and converting equals converting and guiding eps. `rescale_betas_zero_snr` rescales
the schedule so that alpha_bar_T = 0 (Lin et al. 2024, Algorithm 1): the last timestep is pure noise, which
only a v-prediction network can denoise.
Timestep spacings and defaults follow diffusers' `DDIMScheduler` so that a seed gives the same image.

One exception: with "leading" spacing, `steps_offset` 1 (SD v1) and as many steps as training timesteps
(1000), diffusers' timesteps are 1000, 999, ..., 1 and its step indexes alpha_bar[1000], past the end of
the schedule (an IndexError; diffusers issue #10003). Here the offset is cut to what keeps the first
timestep at T - 1: 999, 998, ..., 0, exactly what diffusers gives without the offset. Every step count
diffusers can run gives its timesteps unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from .errors import UserError


@dataclass(frozen=True)
class DDIMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # or "linear"
    steps_offset: int = 1  # SD v1: timesteps 981, 961, ..., 1 for 50 steps
    set_alpha_to_one: bool = False  # SD v1: the final "previous" alpha_bar is alpha_bar_0, not 1
    timestep_spacing: str = "leading"  # or "trailing", "linspace"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"  # or "v_prediction"
    rescale_betas_zero_snr: bool = False

    def updated(self, values: dict) -> DDIMConfig:
        """This config with the keys of a diffusers `scheduler_config.json` that it knows overlaid.

        Keys it does not know are ignored, unless they ask for something DDIM here does not do."""
        bad = [f"{k}={values[k]!r}" for k, off in UNSUPPORTED.items() if values.get(k, off) != off]
        if bad:
            raise UserError(f"the scheduler config sets {', '.join(bad)}, which this DDIM does not implement")
        known = {f.name for f in fields(self)}
        return DDIMConfig(**{**self.__dict__, **{k: v for k, v in values.items() if k in known}})


UNSUPPORTED = {"thresholding": False, "trained_betas": None}  # key -> the off value
# What current diffusers' DDIMScheduler assumes for a key its scheduler_config.json lacks (an old LDM config has
# no steps_offset / set_alpha_to_one: timesteps 980, ..., 0 and a final alpha_bar of 1).
DIFFUSERS_DEFAULTS = DDIMConfig(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", steps_offset=0,
                                set_alpha_to_one=True, clip_sample=True)


class DDIM:
    def __init__(self, cfg: DDIMConfig = DDIMConfig()):
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise UserError(f"prediction_type {cfg.prediction_type!r} is not supported: use 'epsilon' or "
                            "'v_prediction'")
        if cfg.rescale_betas_zero_snr and cfg.prediction_type != "v_prediction":
            raise UserError("rescale_betas_zero_snr needs prediction_type 'v_prediction': at alpha_bar_T = 0 "
                            "an eps prediction says nothing about z_0")
        if cfg.beta_schedule == "scaled_linear":
            betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps) ** 2
        elif cfg.beta_schedule == "linear":
            betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps)
        else:
            raise UserError(f"beta_schedule {cfg.beta_schedule!r} is not supported (use 'scaled_linear' or 'linear')")
        if cfg.rescale_betas_zero_snr:  # shift and scale sqrt(alpha_bar): its first value kept, its last 0
            root = torch.cumprod(1.0 - betas, dim=0).sqrt()
            root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
            alpha_bar = root ** 2
            betas = 1.0 - torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
        self.cfg = cfg
        self.alpha_bar = torch.cumprod(1.0 - betas, dim=0)  # float32, as diffusers
        self.final_alpha_bar = torch.tensor(1.0) if cfg.set_alpha_to_one else self.alpha_bar[0]

    def timesteps(self, num_steps: int) -> list[int]:
        """The N timesteps of sampling, noisiest first."""
        T = self.cfg.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise UserError(f"the number of steps must be between 1 and {T}, got {num_steps}")
        if self.cfg.timestep_spacing == "leading":
            ratio = T // num_steps
            offset = min(self.cfg.steps_offset, T - 1 - (num_steps - 1) * ratio)  # the first t stays <= T - 1
            t = (np.arange(num_steps) * ratio).round()[::-1] + offset
        elif self.cfg.timestep_spacing == "trailing":
            t = np.round(np.arange(T, 0, -T / num_steps)) - 1
        elif self.cfg.timestep_spacing == "linspace":
            t = np.linspace(0, T - 1, num_steps).round()[::-1]
        else:
            raise UserError(f"timestep_spacing {self.cfg.timestep_spacing!r} is not supported")
        return [int(x) for x in t]

    def alpha_bar_at(self, t: int) -> torch.Tensor:
        return self.alpha_bar[t] if t >= 0 else self.final_alpha_bar

    def prev_timestep(self, t: int, num_steps: int) -> int:
        return t - self.cfg.num_train_timesteps // num_steps

    def eps_and_z0(self, out: torch.Tensor, t: int, z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output at (z_t, t), eps or v as the config says -> (eps, z0_hat)."""
        a_t = self.alpha_bar_at(t)
        if self.cfg.prediction_type == "v_prediction":
            return a_t ** 0.5 * out + (1 - a_t) ** 0.5 * z_t, a_t ** 0.5 * z_t - (1 - a_t) ** 0.5 * out
        return out, (z_t - (1 - a_t) ** 0.5 * out) / a_t ** 0.5

    def predict_z0(self, out: torch.Tensor, t: int, z_t: torch.Tensor) -> torch.Tensor:
        return self.eps_and_z0(out, t, z_t)[1]

    def target(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output for z_t = sqrt(alpha_bar_t) z0 + sqrt(1 - alpha_bar_t) eps."""
        if self.cfg.prediction_type == "epsilon":
            return eps
        a = self.alpha_bar[t].view(-1, *[1] * (z0.dim() - 1))
        return a.sqrt() * eps - (1 - a).sqrt() * z0

    def step(self, out: torch.Tensor, t: int, z_t: torch.Tensor, num_steps: int,
             eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
        """z_t -> z_{t'} (DDIM Eq. 12), `out` the network's (guided) eps or v at t. With eta > 0, `noise` ~ N(0, I)
        shaped like z_t must be given."""
        t_prev = self.prev_timestep(t, num_steps)
        a_t, a_prev = self.alpha_bar_at(t), self.alpha_bar_at(t_prev)
        eps, z0 = self.eps_and_z0(out, t, z_t)
        if self.cfg.clip_sample:
            z0 = z0.clamp(-self.cfg.clip_sample_range, self.cfg.clip_sample_range)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        z_prev = a_prev ** 0.5 * z0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
        if eta > 0:
            if noise is None:
                raise ValueError("eta > 0 needs a noise tensor")
            z_prev = z_prev + sigma * noise
        return z_prev

    def invert_step(self, out: torch.Tensor, t: int, z_prev: torch.Tensor, num_steps: int) -> torch.Tensor:
        """The deterministic step run backwards: z_{t'} -> z_t, with the output predicted at t from z_{t'} (DDIM
        inversion). A v output is read at z_{t'}'s own noise level, as diffusers' DDIMInverseScheduler does."""
        a_t, a_prev = self.alpha_bar_at(t), self.alpha_bar_at(self.prev_timestep(t, num_steps))
        eps = out
        if self.cfg.prediction_type == "v_prediction":
            eps = a_prev ** 0.5 * out + (1 - a_prev) ** 0.5 * z_prev
        z0 = (z_prev - (1 - a_prev) ** 0.5 * eps) / a_prev ** 0.5
        return a_t ** 0.5 * z0 + (1 - a_t) ** 0.5 * eps
