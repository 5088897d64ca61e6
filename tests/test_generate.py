"""A whole seeded generation from a diffusers folder equals diffusers' StableDiffusionPipeline."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.errors import UserError
from p2p.cli import main as cli
from p2p.core.controller import Controller, GuidanceLayout
from p2p.core.pipeline import Pipeline
from tests.tiny import reference_pipeline, save_folder


@pytest.fixture(scope="module")
def folder(clip_vocab_dir, tmp_path_factory):
    ref = reference_pipeline(clip_vocab_dir)
    return ref, save_folder(ref, tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder[1], device="cpu")


def reference_images(ref, prompt, seed, **kw):
    out = ref(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=10, guidance_scale=7.5, height=64, width=64),
    dict(num_inference_steps=6, guidance_scale=4.0, height=48, width=80, eta=0.5),
    dict(num_inference_steps=5, guidance_scale=1.0, height=64, width=64),
])
def test_seeded_generation_equals_diffusers(folder, pipe, kw):
    ref, _ = folder
    prompt = "a photograph of an astronaut riding a horse"
    expected = reference_images(ref, prompt, seed=3, **kw)[0]
    (got,) = pipe.generate(prompt, seed=3, steps=kw["num_inference_steps"], guidance=kw["guidance_scale"],
                           height=kw["height"], width=kw["width"], eta=kw.get("eta", 0.0), progress=False)
    got = np.asarray(got)
    assert expected.std() > 5  # not a flat image: the comparison means something
    assert np.abs(got.astype(float) - expected).mean() <= 1.0  # within 1/255 on average (issue 2)


def test_initial_latent_is_diffusers_draw(pipe):
    z = pipe.initial_latent(42, 64, 64)
    assert torch.equal(z, torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(42)))


def test_text_states_equal_diffusers(folder, pipe):
    ref, _ = folder
    prompts = ["a cat", "an oil painting of a lighthouse at dusk, dramatic sky"]
    expected, _ = ref.encode_prompt(prompts, "cpu", 1, False)
    assert (pipe.encode_text(prompts) - expected).abs().max() <= 1e-4


class Layouts(Controller):
    def __init__(self):
        self.calls = []

    def begin_step(self, step, t, layout):
        super().begin_step(step, t, layout)
        self.calls.append((step, t, layout))


def test_low_memory_equals_batched_and_controller_is_told_the_layout(pipe):
    cond, uncond = pipe.encode_text(["a red cube", "a blue ball"]), pipe.encode_text([""])
    z_T = pipe.initial_latent(0, 64, 64)
    a, b = Layouts(), Layouts()
    batched = pipe.denoise(z_T, cond, uncond, steps=4, guidance=7.5, controller=a, progress=False)
    split = pipe.denoise(z_T, cond, uncond, steps=4, guidance=7.5, controller=b, low_memory=True, progress=False)
    assert (batched - split).abs().max() <= 1e-4 * batched.abs().max()  # float reassociation only
    ts = pipe.ddim.timesteps(4)
    assert a.calls == [(i, t, GuidanceLayout(2, slice(0, 2), slice(2, 4))) for i, t in enumerate(ts)]
    assert b.calls == [c for i, t in enumerate(ts) for c in ((i, t, GuidanceLayout(2, slice(0, 2), None)),
                                                             (i, t, GuidanceLayout(2, None, slice(0, 2))))]



class Latents(Layouts):
    """Also keeps z after each step."""

    def end_step(self, step, z):
        self.calls.append(("z", step, z.clone()))
        return super().end_step(step, z)


def test_denoise_from_a_later_step_continues_the_same_run(pipe):
    """`start=k` from the latent after k steps finishes exactly as the run that went through them (SDEdit's use),
    and the controller sees the steps of the whole schedule."""
    cond, uncond = pipe.encode_text(["a red cube", "a blue ball"]), pipe.encode_text([""])
    z_T, whole, rest = pipe.initial_latent(0, 64, 64), Latents(), Latents()
    expected = pipe.denoise(z_T, cond, uncond, steps=5, guidance=7.5, controller=whole, progress=False)
    (z_2,) = [z for tag, step, z in whole.calls if tag == "z" and step == 1]  # after steps 0 and 1
    got = pipe.denoise(z_2, cond, uncond, steps=5, guidance=7.5, controller=rest, start=2, progress=False)
    assert torch.equal(got, expected)
    assert [c for c in rest.calls if c[0] != "z"] == [c for c in whole.calls if c[0] != "z"][2:]
    with pytest.raises(UserError, match="0 <= start < 5"):
        pipe.denoise(z_T, cond, uncond, steps=5, guidance=7.5, start=5, progress=False)

def test_same_seed_same_image_and_shared_noise(pipe):
    """Several prompts share z_T (Prompt-to-Prompt's setting): prompt k of a batch equals it alone."""
    both = pipe.generate(["a red cube", "a blue ball"], seed=5, steps=3, progress=False)
    alone = pipe.generate("a blue ball", seed=5, steps=3, progress=False)
    assert np.abs(np.asarray(both[1], float) - np.asarray(alone[0], float)).max() <= 1


def test_bad_size(pipe):
    with pytest.raises(ValueError, match="multiples of 8"):
        pipe.generate("a cat", height=60, steps=1, progress=False)


def test_cli_generate_writes_png_with_settings(folder, tmp_path, capsys):
    ref, path = folder
    out = tmp_path / "cat.png"
    assert cli(["generate", "--model", str(path), "--prompt", "a cat", "--seed", "7", "--steps", "4",
                "--height", "64", "--width", "64", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    img = Image.open(out)
    settings = json.loads(img.text["p2p"])
    assert settings["prompt"] == "a cat" and settings["seed"] == 7 and settings["steps"] == 4
    assert settings["guidance"] == 7.5
    expected = reference_images(ref, "a cat", seed=7, num_inference_steps=4, height=64, width=64)[0]
    assert np.abs(np.asarray(img.convert("RGB"), float) - expected).mean() <= 1.0


def test_cli_reports_a_missing_model(tmp_path, capsys):
    assert cli(["generate", "--model", str(tmp_path / "nope"), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "model not found" in err and "p2p download" in err
    assert not (tmp_path / "x.png").exists()


def test_cli_download_list_and_unknown_name(capsys):
    assert cli(["download", "--list"]) == 0
    assert "sd-v1-5-diffusers" in capsys.readouterr().out
    assert cli(["download", "sd-v9", "--dir", "unused"]) == 2
    err = capsys.readouterr().err
    assert "sd-v9" in err and "sd-v1-5" in err


def test_1000_steps_match_diffusers_where_it_runs():
    """SD v1's schedule ("leading", steps_offset 1) at 1000 steps: diffusers' timesteps are 1000, ..., 1 and its
    step indexes alpha_bar[1000] (an IndexError, diffusers issue #10003). Ours drop the offset there and so are
    diffusers' without it, 999, ..., 0, step for step; the step counts diffusers runs are unchanged."""
    from diffusers import DDIMScheduler

    from models.ddim import DDIM

    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
              set_alpha_to_one=False)
    with_offset, without = DDIMScheduler(**sd, steps_offset=1), DDIMScheduler(**sd, steps_offset=0)
    with_offset.set_timesteps(1000)
    assert with_offset.timesteps[0] == 1000  # the cause: one past the last training timestep
    without.set_timesteps(1000)
    ours = DDIM()
    assert ours.timesteps(1000) == without.timesteps.tolist() == list(range(999, -1, -1))
    g = torch.Generator().manual_seed(0)
    z = z_ref = torch.randn(1, 4, 8, 8, generator=g)
    for t in ours.timesteps(1000):
        eps = torch.randn(z.shape, generator=g)
        z_ref = without.step(eps, t, z_ref).prev_sample
        z = ours.step(eps, t, z, 1000)
    assert torch.isfinite(z).all() and (z - z_ref).abs().max() <= 1e-4 * z_ref.abs().max()
    for steps in (999, 500, 334, 50):  # every count diffusers can run keeps its timesteps (offset 1)
        with_offset.set_timesteps(steps)
        assert ours.timesteps(steps) == with_offset.timesteps.tolist()
