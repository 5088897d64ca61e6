"""Our edits against an independent implementation of the authors' controllers (tests/reference_p2p.py, which runs
them on diffusers attention processors), on the same tiny random weights and seed, for every model family: SD v1
(tiny), SD 2 predicting eps and v (tiny-sd2: per-level heads, linear projections, OpenCLIP padding) and SDXL
(tiny-sdxl: attention at the two lower levels only, deep transformer stacks, two text towers, micro-conditioning,
zeroed negative prompt).

Each family saves a diffusers reference pipeline as a folder and loads it with our loader. Both start from the same
z_T and use the same DDIM schedule (diffusers' DDIMScheduler with the model's prediction type); ours runs fused
attention where no map is needed, theirs computes every map, so results agree to rounding, not bit for bit. Random
weights make the sampler chaotic (float32 rounding noise grows about tenfold per step), so both run in float64: any
real difference then stands out by many orders of magnitude. Every case asserts z_0 within 1e-9 (relative) and the
images within 1/255 (mean).

The reference conditions SDXL as diffusers' SDXL pipeline does (`R.text2image_xl`). The layers edited differ by
family and are given to the authors' controllers as `self_replace_cap`: SD keeps the authors' absolute 16 x 16 keys
(every layer of the tiny models); SDXL's rule (sites.py) injects self-attention, and reads the blend, at the latent/4
level only: 2x2 at 64 px, `self_replace_cap` 2**2.
"""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from models.presets import PRESETS, ModelConfig
from p2p.core.pipeline import Pipeline
from p2p.core.run import run_edit
from p2p.core.settings import EditSettings
from p2p.core.sites import SiteSelection, p2p_defaults
from tests import reference_p2p as R
from tests.tiny import reference_pipeline, reference_xl_pipeline, save_folder, tiny_sd2

STEPS = 10


@dataclass(frozen=True)
class Family:
    """One model family as both sides run it. `size` is the image side of the edits; `self_sites` (ours, None: the
    family's default) and `self_replace_cap` (theirs) select the same self-attention layers; the local-blend edit runs
    at `blend_size` with our extra `blend_settings`, their `blend_cap` and `local_blend` class."""
    cfg: ModelConfig
    size: int
    self_sites: Optional[SiteSelection]
    self_replace_cap: int
    blend_size: int
    blend_settings: dict = field(default_factory=dict)
    blend_cap: int = 16 ** 2
    local_blend: type = R.LocalBlend

    @property
    def text2image(self):
        return R.text2image_xl if self.cfg.family == "sdxl" else R.text2image


# SD: blend from the 4x4 maps of a 128 px image (the tiny model's 2x2 native blend level) with a threshold that makes
# a real mask (see reference_p2p.py's caveat). SD 2 edits at 128 px throughout: at 64 px the tiny UNet's lowest level
# is 1x1, where GroupNorm sees 2 values per group and turns float64 rounding into jumps; the v sampler then ends 1e-9
# to 4e-7 apart (relative) depending on the random weights, against 1e-14 at 128 px for the same weights, with or
# without an edit (measured, plain sampling too). SDXL: the blend from the default sites (native 2x2, the latent/4
# level: the 8x8 maps of a 256 px image, which the authors' LocalBlend reads at a 32x32 latent), self-attention
# injected at that level too (8**2 keys).
SD_SELF, SD_BLEND = SiteSelection(max_res=16), dict(blend_sites=SiteSelection(kinds=("cross",), res=(2,)))
FAMILIES = {
    "sd-v1": Family(PRESETS["tiny"], 64, SD_SELF, 16 ** 2, 128, SD_BLEND),
    "sd-v2-eps": Family(tiny_sd2("epsilon", upcast=False), 128, SD_SELF, 16 ** 2, 128, SD_BLEND),
    "sd-v2-v": Family(tiny_sd2("v_prediction", upcast=False), 128, SD_SELF, 16 ** 2, 128, SD_BLEND),
    "sdxl": Family(PRESETS["tiny-sdxl"], 64, None, 2 ** 2, 256, dict(self_sites=SiteSelection(max_res=8)), 8 ** 2,
                   R.LocalBlendXL),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, clip_vocab_dir, tmp_path_factory):
    """(family, reference pipeline, our pipeline read from the reference saved as a diffusers folder), float64."""
    fam = FAMILIES[request.param]
    if fam.cfg.family == "sdxl":
        ref = reference_xl_pipeline(clip_vocab_dir, cfg=fam.cfg)
    else:
        ref = reference_pipeline(clip_vocab_dir, cfg=fam.cfg)
    path = save_folder(ref, tmp_path_factory.mktemp(f"tiny_{request.param}"))
    ours = Pipeline.from_pretrained(path, device="cpu", dtype=torch.float64)
    assert ours.cfg.family == fam.cfg.family and ours.cfg.ddim.prediction_type == fam.cfg.ddim.prediction_type
    assert p2p_defaults(ours.cfg) == p2p_defaults(fam.cfg)
    return fam, ref.to(torch.float64), ours


def reference(pair, prompts, controller, seed, size):
    """Their images and latent trajectory [z_T, ..., z_0]."""
    fam, ref, _ = pair
    scheduler = DDIMScheduler(**R.SD_V1_DDIM, prediction_type=fam.cfg.ddim.prediction_type)
    return fam.text2image(ref, prompts, controller, num_steps=STEPS, guidance_scale=fam.cfg.guidance, seed=seed,
                          height=size, width=size, scheduler=scheduler, return_latents=True)


def compare(pair, settings: EditSettings, controller):
    """Theirs and ours on the same edit: (z_0 relative max difference, mean pixel difference /255, our result, their
    trajectory)."""
    _, _, ours = pair
    expected, traj = reference(pair, settings.prompts, controller, settings.seed, settings.height)
    got = run_edit(ours, settings, progress=False)
    rel = ((got.z_0 - traj[-1]).abs().max() / traj[-1].abs().max()).item()
    pixels = np.abs(np.stack([np.asarray(i, float) for i in got.images]) - expected).mean()
    print(f"relative {rel:.2e}, pixels {pixels:.4f}/255")
    return rel, pixels, got, traj


def settings(pair, prompt, targets, **kw):
    fam = pair[0]
    size = kw.pop("size", fam.size)
    if fam.self_sites is not None:
        kw.setdefault("self_sites", fam.self_sites)
    return EditSettings(prompt, targets=tuple(targets), steps=STEPS, seed=kw.pop("seed", 1), height=size, width=size,
                        guidance=fam.cfg.guidance, **kw)


PROMPTS = "a cat on a chair", ["a dog on a chair"]


@pytest.fixture(scope="module")
def unedited(pair):
    """Their z_0 of the replace prompts sampled without injection (once per family)."""
    _, ref, _ = pair
    s = settings(pair, *PROMPTS)
    plain = R.AttentionReplace(s.prompts, STEPS, 0.0, 0.0, tokenizer=ref.tokenizer)
    return reference(pair, s.prompts, plain, s.seed, s.height)[1][-1]


@pytest.mark.parametrize("cross,self_,moves", [(0.8, 0.4, True), ({"default_": 1.0, "dog": 0.4}, 0.6, True),
                                               ((0.2, 0.7), (0.1, 0.5), False)], ids=["fraction", "per-word", "ranges"])
def test_replace(pair, unedited, cross, self_, moves):
    """`moves`: the edit changes the result (the edited prompt's z_0 is not the one sampled without injection), so
    that the comparison means something; the short windows of the third case move SDXL's z_0 by 7e-4 of its scale
    only (measured), under the 1e-3 the check asks."""
    fam, ref, _ = pair
    s = settings(pair, *PROMPTS, cross_replace=cross, self_replace=self_)
    ctl = R.AttentionReplace(s.prompts, STEPS, cross, self_, tokenizer=ref.tokenizer,
                             self_replace_cap=fam.self_replace_cap)
    rel, pixels, _, traj = compare(pair, s, ctl)
    if moves:
        assert (unedited[1] - traj[-1][1]).abs().max() > 1e-3 * traj[-1].abs().max()
    assert rel <= 1e-9 and pixels <= 1.0


def test_refine(pair):
    fam, ref, _ = pair
    s = settings(pair, "a castle next to a river", ["children drawing of a castle next to a river"], mode="refine")
    ctl = R.AttentionRefine(s.prompts, STEPS, 0.8, 0.4, tokenizer=ref.tokenizer, self_replace_cap=fam.self_replace_cap)
    rel, pixels, _, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0


def test_reweight_alone_and_chained(pair):
    fam, ref, _ = pair
    cap = fam.self_replace_cap
    s = settings(pair, "a fluffy ball", [], mode="reweight", reweight={"fluffy": 4.0})
    eq = R.get_equalizer(s.prompts[1], ("fluffy",), (4.0,), ref.tokenizer)
    ctl = R.AttentionReweight(s.prompts, STEPS, 0.8, 0.4, eq, tokenizer=ref.tokenizer, self_replace_cap=cap)
    rel, pixels, _, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0

    s = settings(pair, "a bowl of soup", ["a bowl of pea soup"], mode="refine", reweight={"pea": -1.0})
    base = R.AttentionRefine(s.prompts, STEPS, 0.8, 0.4, tokenizer=ref.tokenizer, self_replace_cap=cap)
    eq = R.get_equalizer(s.prompts[1], ("pea",), (-1.0,), ref.tokenizer)
    ctl = R.AttentionReweight(s.prompts, STEPS, 0.8, 0.4, eq, controller=base, tokenizer=ref.tokenizer,
                              self_replace_cap=cap)
    rel, pixels, _, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0


def test_local_blend(pair):
    """At the family's blend size (FAMILIES) with a threshold that makes a real mask: both masks equal, and neither
    everything nor nothing."""
    fam, ref, _ = pair
    cross = {"default_": 1.0, "dog": 0.4}
    s = settings(pair, "a cat on a chair", ["a dog on a chair"], blend=("cat", "dog"), blend_threshold=0.95,
                 size=fam.blend_size, cross_replace=cross, **fam.blend_settings)
    blend = fam.local_blend(s.prompts, ("cat", "dog"), ref.tokenizer, threshold=0.95)
    ctl = R.AttentionReplace(s.prompts, STEPS, cross, 0.4, local_blend=blend, tokenizer=ref.tokenizer,
                             self_replace_cap=fam.blend_cap)
    rel, pixels, got, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0
    latent = fam.blend_size // 8
    ours_mask = got.controller.controllers[1].mask((latent, latent))
    assert 0 < ours_mask[1].mean() < 1  # a real mask, not everything
    assert torch.equal(ours_mask, blend.masks[-1].float())
