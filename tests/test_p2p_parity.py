"""Our edits against an independent implementation of the authors' controllers (tests/reference_p2p.py,
which runs them on diffusers attention processors), on the same tiny random weights and seed.

Both start from the same z_T and use the same DDIM schedule; ours runs fused attention where no map
is needed, theirs computes every map, so results agree to rounding, not bit for bit. Random weights
make the sampler chaotic (float32 rounding noise grows about tenfold per step), so both run in
float64: any real difference then stands out by many orders of magnitude.
"""
import numpy as np
import pytest
import torch

from p2p.core.settings import EditSettings
from p2p.core.sites import SiteSelection

from p2p.core.run import run_edit
from p2p.core.pipeline import Pipeline
from tests import reference_p2p as R
from tests.tiny import reference_pipeline

STEPS = 10


@pytest.fixture(scope="module")
def pair(clip_vocab_dir, tmp_path_factory):
    ref = reference_pipeline(clip_vocab_dir)
    path = tmp_path_factory.mktemp("tiny_sd")
    ref.save_pretrained(path, safe_serialization=True)
    return ref.to(torch.float64), Pipeline.from_pretrained(path, device="cpu", dtype=torch.float64)


def compare(pair, settings: EditSettings, controller, size=64):
    ref, ours = pair
    expected, traj = R.text2image(ref, settings.prompts, controller, num_steps=STEPS, guidance_scale=7.5,
                                  seed=settings.seed, height=size, width=size, return_latents=True)
    got = run_edit(ours, settings, progress=False)
    z_ref = traj[-1]
    rel = ((got.z_0 - z_ref).abs().max() / z_ref.abs().max()).item()
    pixels = np.abs(np.stack([np.asarray(i, float) for i in got.images]) - expected).mean()
    return rel, pixels, got


def settings(prompt, targets, **kw):
    size = kw.pop("size", 64)
    # the reference's self-injection cap is the authors' absolute 16 x 16 keys: every layer of the tiny model
    return EditSettings(prompt, targets=tuple(targets), steps=STEPS, seed=kw.pop("seed", 1), height=size, width=size,
                        self_sites=SiteSelection(max_res=16), **kw)


@pytest.mark.parametrize("cross,self_", [(0.8, 0.4), ({"default_": 1.0, "dog": 0.4}, 0.6), ((0.2, 0.7), (0.1, 0.5))])
def test_replace(pair, cross, self_):
    ref, _ = pair
    s = settings("a cat on a chair", ["a dog on a chair"], cross_replace=cross, self_replace=self_)
    ctl = R.AttentionReplace(s.prompts, STEPS, cross, self_, tokenizer=ref.tokenizer)
    rel, pixels, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0


def test_refine(pair):
    ref, _ = pair
    s = settings("a castle next to a river", ["children drawing of a castle next to a river"], mode="refine")
    ctl = R.AttentionRefine(s.prompts, STEPS, 0.8, 0.4, tokenizer=ref.tokenizer)
    rel, pixels, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0


def test_reweight_alone_and_chained(pair):
    ref, _ = pair
    s = settings("a fluffy ball", [], mode="reweight", reweight={"fluffy": 4.0})
    eq = R.get_equalizer(s.prompts[1], ("fluffy",), (4.0,), ref.tokenizer)
    ctl = R.AttentionReweight(s.prompts, STEPS, 0.8, 0.4, eq, tokenizer=ref.tokenizer)
    rel, pixels, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0

    s = settings("a bowl of soup", ["a bowl of pea soup"], mode="refine", reweight={"pea": -1.0})
    base = R.AttentionRefine(s.prompts, STEPS, 0.8, 0.4, tokenizer=ref.tokenizer)
    eq = R.get_equalizer(s.prompts[1], ("pea",), (-1.0,), ref.tokenizer)
    ctl = R.AttentionReweight(s.prompts, STEPS, 0.8, 0.4, eq, controller=base, tokenizer=ref.tokenizer)
    rel, pixels, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0


def test_local_blend(pair):
    """At 128 px (4x4 maps at the tiny model's blend level) with a threshold that makes a real mask."""
    ref, _ = pair
    s = settings("a cat on a chair", ["a dog on a chair"], blend=("cat", "dog"), blend_threshold=0.95,
                 blend_sites=SiteSelection(kinds=("cross",), res=(2,)),
                 size=128, cross_replace={"default_": 1.0, "dog": 0.4})
    blend = R.LocalBlend(s.prompts, ("cat", "dog"), ref.tokenizer, threshold=0.95)
    ctl = R.AttentionReplace(s.prompts, STEPS, {"default_": 1.0, "dog": 0.4}, 0.4, local_blend=blend,
                             tokenizer=ref.tokenizer)
    rel, pixels, got = compare(pair, s, ctl, size=128)
    assert rel <= 1e-9 and pixels <= 1.0
    ours_mask = got.controller.controllers[1].mask((16, 16))
    theirs_mask = blend.masks[-1].float()
    assert 0 < ours_mask[1].mean() < 1  # a real mask, not everything
    assert torch.equal(ours_mask, theirs_mask)
