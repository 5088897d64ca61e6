"""Parity at the full SD v1 configuration (860M-parameter UNet), random weights, 32x32 latent.

Slow (a few minutes and ~10 GB of RAM on a CPU): `pytest -m slow tests/test_full_size.py`.
"""
import numpy as np
import pytest
import torch

from models.presets import PRESETS
from tests.tiny import ours_from_reference, reference_pipeline

pytestmark = pytest.mark.slow
SD = PRESETS["sd-v1"]


@pytest.fixture(scope="module")
def pair(clip_vocab_dir):
    ref = reference_pipeline(clip_vocab_dir, cfg=SD)
    return ref, ours_from_reference(ref, SD, clip_vocab_dir)


def test_unet(pair):
    ref, ours = pair
    g = torch.Generator().manual_seed(0)
    z_t, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        err = (ours.unet(z_t, 981, ctx) - ref.unet(z_t, 981, encoder_hidden_states=ctx).sample).abs().max().item()
    assert err <= 1e-4


def test_vae(pair):
    ref, ours = pair
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert (ours.vae.posterior(x)[0] - ref.vae.encode(x).latent_dist.mean).abs().max() <= 1e-4
        z = torch.randn(1, 4, 32, 32)
        assert (ours.vae.decode(z) - ref.vae.decode(z / 0.18215).sample).abs().max() <= 1e-4


def test_text_encoder(pair):
    ref, ours = pair
    ids = ours.tokenizer.encode(["a photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        assert (ours.text_encoder(ids) - ref.text_encoder(ids).last_hidden_state).abs().max() <= 1e-4


def test_seeded_generation(pair):
    ref, ours = pair
    prompt = "a photograph of an astronaut riding a horse"
    expected = ref(prompt, num_inference_steps=4, height=256, width=256,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    expected = (expected * 255).round()
    (got,) = ours.generate(prompt, seed=0, steps=4, height=256, width=256, progress=False)
    assert np.abs(np.asarray(got, float) - expected).mean() <= 1.0
