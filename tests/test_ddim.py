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


ZERO_SNR_V = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                 steps_offset=0, set_alpha_to_one=True)
SETTINGS = {"eps": {}, "eps-clip": dict(clip_sample=True), "v": dict(prediction_type="v_prediction"),
            "zero-snr-v": ZERO_SNR_V}


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_sampling_matches_diffusers(name, eta):
    """Ten updates from the same network outputs (eps or v, as the config says) and the same noise."""
    settings = SETTINGS[name]
    ref = DDIMScheduler(**{**SD, **settings})
    ours = DDIM(DDIMConfig(**settings))
    assert torch.equal(ours.alpha_bar, ref.alphas_cumprod)
    if settings.get("rescale_betas_zero_snr"):
        assert ours.alpha_bar[-1].item() == 0 and ours.alpha_bar[0].item() == pytest.approx(0.99915, abs=1e-5)
    steps = 10
    ref.set_timesteps(steps)
    assert ours.timesteps(steps) == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    z = z_ref = torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.timesteps(steps):
        y = torch.randn(z.shape, generator=g)
        z_ref = ref.step(y, t, z_ref, eta=eta, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(t))
        z = ours.step(y, t, z, steps, eta=eta, noise=noise)
    assert (z - z_ref).abs().max() <= 1e-5


def test_v_inversion_step_matches_diffusers_inverse_scheduler():
    from diffusers import DDIMInverseScheduler
    settings = dict(prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1)
    ref = DDIMInverseScheduler(**{**SD, **settings})
    ours = DDIM(DDIMConfig(**settings))
    steps = 10
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    z = z_ref = torch.randn(1, 4, 8, 8, generator=g)
    for t_ref, t in zip(ref.timesteps.tolist(), ours.timesteps(steps)[::-1]):
        v = torch.randn(z.shape, generator=g)
        z_ref = ref.step(v, t_ref, z_ref).prev_sample
        z = ours.invert_step(v, t, z, steps)
    assert (z - z_ref).abs().max() <= 1e-5


def test_v_target_is_what_the_step_decodes():
    """Training on `target` and sampling with `step` agree: the true v at t gives back z_0 and eps."""
    ddim = DDIM(DDIMConfig(**ZERO_SNR_V))
    z0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([999, 500, 3])
    a = ddim.alpha_bar[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    v = ddim.target(z0, eps, t)
    for i in range(3):
        eps_hat, z0_hat = ddim.eps_and_z0(v[i], int(t[i]), z_t[i])
        assert torch.allclose(z0_hat, z0[i], atol=1e-5)
        if i > 0:  # at alpha_bar_T = 0, z_t is eps itself
            assert torch.allclose(eps_hat, eps[i], atol=1e-4)


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
    with pytest.raises(ValueError, match="'epsilon' or 'v_prediction'"):
        DDIM(DDIMConfig(prediction_type="sample"))
    with pytest.raises(ValueError, match="zero_snr needs prediction_type 'v_prediction'"):
        DDIM(DDIMConfig(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="eta > 0 needs a noise"):
        DDIM().step(torch.zeros(1), 981, torch.zeros(1), 50, eta=0.5)


def test_config_overlay_from_scheduler_json():
    cfg = DDIMConfig().updated({"_class_name": "PNDMScheduler", "skip_prk_steps": True, "steps_offset": 0,
                                "set_alpha_to_one": True})
    assert cfg.steps_offset == 0 and cfg.set_alpha_to_one and cfg.beta_schedule == "scaled_linear"
