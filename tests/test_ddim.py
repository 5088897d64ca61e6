"""DDIM against diffusers' DDIMScheduler (timesteps and updates) and against the closed form."""
import pytest
import torch
from diffusers import DDIMScheduler

from models.ddim import DDIM, DDIMConfig

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
          set_alpha_to_one=False, steps_offset=1)


def test_sd_v1_schedule_reference_values():
    ddim = DDIM()
    assert ddim.alpha_bar[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert ddim.alpha_bar[999].item() == pytest.approx(0.0046601, abs=1e-6)
    assert ddim.timesteps(50)[:3] == [981, 961, 941] and ddim.timesteps(50)[-1] == 1
    assert ddim.final_alpha_bar == ddim.alpha_bar[0]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("alpha_to_one", [False, True])
@pytest.mark.parametrize("steps", [50, 7, 1])
def test_timesteps_match_diffusers(spacing, alpha_to_one, steps):
    ref = DDIMScheduler(**{**SD, "set_alpha_to_one": alpha_to_one}, timestep_spacing=spacing)
    ref.set_timesteps(steps)
    ours = DDIM(DDIMConfig(timestep_spacing=spacing, set_alpha_to_one=alpha_to_one))
    assert ours.timesteps(steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("clip", [False, True])
def test_updates_match_diffusers(eta, clip):
    ref = DDIMScheduler(**{**SD, "clip_sample": clip})
    ours = DDIM(DDIMConfig(clip_sample=clip))
    steps = 10
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    z = z_ref = torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.timesteps(steps):
        eps = torch.randn(z.shape, generator=g)
        z_ref = ref.step(eps, t, z_ref, eta=eta, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
        z = ours.step(eps, t, z, steps, eta=eta, noise=noise)
    assert (z - z_ref).abs().max() <= 1e-5


def test_step_recovers_z0_when_eps_is_the_true_noise():
    """If eps is the noise that made z_t from z_0, one deterministic step lands on q's mean path exactly."""
    ddim = DDIM()
    z0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t, steps = 981, 50
    a = ddim.alpha_bar[t]
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    assert torch.allclose(ddim.predict_z0(eps, t, z_t), z0, atol=1e-5)
    a_prev = ddim.alpha_bar[t - 20]
    assert torch.allclose(ddim.step(eps, t, z_t, steps), a_prev.sqrt() * z0 + (1 - a_prev).sqrt() * eps, atol=1e-5)


def test_invert_step_undoes_step():
    ddim = DDIM()
    z_t, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    z_prev = ddim.step(eps, 501, z_t, 50)
    assert torch.allclose(ddim.invert_step(eps, 501, z_prev, 50), z_t, atol=1e-5)


def test_bad_settings():
    with pytest.raises(ValueError, match="between 1 and 1000"):
        DDIM().timesteps(0)
    with pytest.raises(ValueError, match="v_prediction.*SD 2"):
        DDIM(DDIMConfig(prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="eta > 0 needs a noise"):
        DDIM().step(torch.zeros(1), 981, torch.zeros(1), 50, eta=0.5)


def test_config_overlay_from_scheduler_json():
    cfg = DDIMConfig().updated({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "steps_offset": 0,
                                "set_alpha_to_one": True})
    assert cfg.steps_offset == 0 and cfg.set_alpha_to_one and cfg.beta_schedule == "scaled_linear"
