"""Prompt-to-Prompt on SDXL (the tiny-sdxl preset: attention only at the two lower levels, deep transformer stacks,
two text towers, micro-conditioning, zeroed negative prompt).

Edits are compared with the authors' controllers (tests/reference_p2p.py) run over diffusers' attention processors
of a StableDiffusionXLPipeline with the same weights and seed, in float64 as tests/test_sd2_p2p.py does for SD 2.
The reference conditions as diffusers' SDXL pipeline does (encode_prompt: both towers, pooled vector, zeros for
the empty negative prompt; time ids of the image size, crop (0, 0)). SDXL's rule (sites.py): self-attention
injected, and the blend read, at the latent/4 level only: at the tiny size the 2x2 grid, `self_replace_cap` 2**2.
"""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from models.presets import PRESETS, preset
from models.unet import UNet
from p2p.core.controller import GuidanceLayout
from p2p.core.pipeline import Pipeline
from p2p.core.run import run_edit
from p2p.core.settings import EditSettings
from p2p.core.sites import SiteSelection, p2p_defaults
from p2p.core.store import AttentionStore
from tests import reference_p2p as R
from tests.tiny import reference_xl_pipeline

STEPS = 10


@pytest.fixture(scope="module")
def pair(clip_vocab_dir, tmp_path_factory):
    ref = reference_xl_pipeline(clip_vocab_dir)
    path = tmp_path_factory.mktemp("tiny_sdxl_p2p")
    ref.save_pretrained(path, safe_serialization=True)
    ours = Pipeline.from_pretrained(path, device="cpu", dtype=torch.float64)
    assert ours.cfg.family == "sdxl" and p2p_defaults(ours.cfg) == p2p_defaults(PRESETS["tiny-sdxl"])
    return ref.to(torch.float64), ours


@torch.no_grad()
def text2image_xl(pipe, prompts, controller, *, num_steps, guidance_scale, seed, height, width):
    """The authors' text2image loop (tests/reference_p2p.py) on a StableDiffusionXLPipeline: conditioning by diffusers'
    encode_prompt, the UNet given the pooled vectors and the time ids, DDIM as SD samples."""
    unet = pipe.unet
    previous = R.register_attention_control(unet, controller)
    try:
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(list(prompts), device="cpu", num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True)
        context = torch.cat([uncond, cond]).to(unet.dtype)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]).to(unet.dtype),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width]], dtype=unet.dtype)
                 .repeat(2 * len(prompts), 1)}
        _, latents = R.init_latent(None, unet, height, width, seed, len(prompts), pipe.vae_scale_factor)
        scheduler = DDIMScheduler(**R.SD_V1_DDIM)
        scheduler.set_timesteps(num_steps)
        trajectory = [latents]
        for t in scheduler.timesteps:
            eps_u, eps_c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context,
                                added_cond_kwargs=added).sample.chunk(2)
            latents = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, latents, eta=0.0).prev_sample
            latents = controller.step_callback(latents)
            trajectory.append(latents)
        images = R.latent2image(pipe.vae, latents)
    finally:
        unet.set_attn_processor(dict(previous))
    return images, trajectory


def compare(pair, settings: EditSettings, controller, size=64):
    ref, ours = pair
    expected, traj = text2image_xl(ref, settings.prompts, controller, num_steps=STEPS, guidance_scale=5.0,
                                   seed=settings.seed, height=size, width=size)
    got = run_edit(ours, settings, progress=False)
    rel = ((got.z_0 - traj[-1]).abs().max() / traj[-1].abs().max()).item()
    pixels = np.abs(np.stack([np.asarray(i, float) for i in got.images]) - expected).mean()
    print(f"relative {rel:.2e}, pixels {pixels:.4f}/255")
    return rel, pixels, got, traj


def settings(prompt, targets, **kw):
    size = kw.pop("size", 64)
    return EditSettings(prompt, targets=tuple(targets), steps=STEPS, seed=kw.pop("seed", 1), height=size, width=size,
                        guidance=5.0, **kw)


@pytest.mark.parametrize("cross,self_", [(0.8, 0.4), ({"default_": 1.0, "dog": 0.4}, 0.6)])
def test_replace(pair, cross, self_):
    ref, _ = pair
    s = settings("a cat on a chair", ["a dog on a chair"], cross_replace=cross, self_replace=self_)
    ctl = R.AttentionReplace(s.prompts, STEPS, cross, self_, tokenizer=ref.tokenizer, self_replace_cap=2 ** 2)
    rel, pixels, _, traj = compare(pair, s, ctl)
    plain = R.AttentionReplace(s.prompts, STEPS, 0.0, 0.0, tokenizer=ref.tokenizer)  # the edit changes the result
    _, traj_plain = text2image_xl(ref, s.prompts, plain, num_steps=STEPS, guidance_scale=5.0, seed=1, height=64,
                                  width=64)
    assert (traj_plain[-1][1] - traj[-1][1]).abs().max() > 1e-3 * traj[-1].abs().max()
    assert rel <= 1e-9 and pixels <= 1.0


def test_refine_and_reweight(pair):
    ref, _ = pair
    s = settings("a castle next to a river", ["children drawing of a castle next to a river"], mode="refine")
    ctl = R.AttentionRefine(s.prompts, STEPS, 0.8, 0.4, tokenizer=ref.tokenizer, self_replace_cap=2 ** 2)
    rel, pixels, _, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0
    s = settings("a bowl of soup", ["a bowl of pea soup"], mode="refine", reweight={"pea": -1.0})
    base = R.AttentionRefine(s.prompts, STEPS, 0.8, 0.4, tokenizer=ref.tokenizer, self_replace_cap=2 ** 2)
    eq = R.get_equalizer(s.prompts[1], ("pea",), (-1.0,), ref.tokenizer)
    ctl = R.AttentionReweight(s.prompts, STEPS, 0.8, 0.4, eq, controller=base, tokenizer=ref.tokenizer,
                              self_replace_cap=2 ** 2)
    rel, pixels, _, _ = compare(pair, s, ctl)
    assert rel <= 1e-9 and pixels <= 1.0


class LocalBlendXL(R.LocalBlend):
    """The authors' LocalBlend reading the cross maps of down, mid and up at the latent/4 level: on SDXL the mid block
    is at that level too (32x32 at 1024 px), and RoyiRa's SDXL port (sd2-sdxl.md §6.1) reads it with the others."""

    @classmethod
    def select_maps(cls, attention_store, latent_hw):
        rh, rw = cls.map_resolution(latent_hw)
        return [m for key in ("down_cross", "mid_cross", "up_cross") for m in attention_store[key]
                if m.shape[1] == rh * rw]


def test_local_blend(pair):
    """The blend from the default sites (native 2x2, the latent/4 level: the 8x8 maps of a 256 px image, which the
    authors' LocalBlend reads at a 32x32 latent); self-attention injected at that level too (8**2 keys)."""
    ref, _ = pair
    s = settings("a cat on a chair", ["a dog on a chair"], blend=("cat", "dog"), blend_threshold=0.95,
                 size=256, cross_replace={"default_": 1.0, "dog": 0.4}, self_sites=SiteSelection(max_res=8))
    blend = LocalBlendXL(s.prompts, ("cat", "dog"), ref.tokenizer, threshold=0.95)
    ctl = R.AttentionReplace(s.prompts, STEPS, {"default_": 1.0, "dog": 0.4}, 0.4, local_blend=blend,
                             tokenizer=ref.tokenizer, self_replace_cap=8 ** 2)
    rel, pixels, got, _ = compare(pair, s, ctl, size=256)
    assert rel <= 1e-9 and pixels <= 1.0
    ours_mask = got.controller.controllers[1].mask((32, 32))
    assert 0 < ours_mask[1].mean() < 1
    assert torch.equal(ours_mask, blend.masks[-1].float())


def test_attention_store_at_1024():
    """The store's memory at SDXL's default size, measured on meta tensors (one UNet call, two prompts with CFG):
    the 60 self and 60 cross sites at 32x32, head-averaged, conditional rows, float32 running sums."""
    cfg = preset("sdxl")
    with torch.device("meta"):
        unet = UNet(cfg.unet)
        z, ctx = torch.empty(4, 4, 128, 128), torch.empty(4, 77, 2048)
        added = torch.empty(4, 1280), torch.empty(4, 6)
    store = AttentionStore(p2p_defaults(cfg).store_sites)
    store.begin_sampling(1)
    store.begin_step(0, 981, GuidanceLayout.batched(2))
    unet(z, 981, ctx, store, added=added)
    sizes = {kind: sum(m.numel() * m.element_size() for s, m in store.sums.items() if s.kind == kind)
             for kind in ("self", "cross")}
    assert len(store.sums) == 120 and {store.sizes[s] for s in store.sums} == {(32, 32)}
    assert sizes == {"self": 60 * 2 * 1024 * 1024 * 4, "cross": 60 * 2 * 1024 * 77 * 4}  # 480 MiB + 36.1 MiB


# --- inversion ------------------------------------------------------------------------------------------------

from dataclasses import replace  # noqa: E402

from models.sdxl import SDXLTokenizer  # noqa: E402
from p2p.core.inversion import invert, reconstruct  # noqa: E402
from p2p.world import scenes  # noqa: E402


@pytest.fixture(scope="module")
def xpipe(clip_vocab_dir):
    """tiny-sdxl in float64 tuned as tests/test_inversion.py tunes tiny: unit-std latents, a small eps, text that
    matters for guidance."""
    cfg = PRESETS["tiny-sdxl"]
    cfg = replace(cfg, vae=replace(cfg.vae, scaling_factor=3.6))
    pipe = Pipeline.from_config(cfg, SDXLTokenizer.from_path(clip_vocab_dir), seed=0, dtype=torch.float64)
    with torch.no_grad():
        pipe.unet.conv_out.weight.mul_(0.05)
        for name, m in pipe.unet.named_modules():
            if name.endswith("attn2"):
                m.to_v.weight.mul_(20)
    return pipe


def test_inversions_reconstruct(xpipe):
    """Null-text, negative-prompt and direct inversion on SDXL: the unconditional psi they start from is the zeroed
    negative prompt (token states and pooled vector), and null-text optimises both (the vector row included).
    Measured, 10 steps, mean((z_0 reconstructed - E(x))^2) / mean(E(x)^2):

        DDIM, w = 1    2.4e-4         DDIM, w = 5      8.2e-2
        null-text      2.3e-2 (3.5x better than DDIM at w = 5; SD v1's tiny model: 2.1e-2)
        negative-prompt = DDIM at w = 1               direct  1.6e-15 (exact; float64)
    """
    image, caption, _ = scenes.sample(1, 0)[0]
    runs = {"ddim@1": ("ddim", 1.0), "ddim@5": ("ddim", 5.0), "null-text": ("null-text", 5.0),
            "negative-prompt": ("negative-prompt", 5.0), "direct": ("direct", 5.0)}
    inv = {k: invert(xpipe, image, caption, m, steps=STEPS, guidance=w, progress=False) for k, (m, w) in runs.items()}
    err = {k: float((reconstruct(xpipe, i, progress=False) - i.z_0).pow(2).mean() / i.z_0.pow(2).mean())
           for k, i in inv.items()}
    print({k: f"{v:.1e}" for k, v in err.items()})
    assert err["ddim@5"] > 10 * err["ddim@1"]
    assert err["null-text"] < err["ddim@5"] / 3
    assert err["negative-prompt"] == pytest.approx(err["ddim@1"], rel=1e-3)
    assert err["direct"] < 1e-10
    phis = inv["null-text"].uncond  # (steps, 78, 80): one optimised psi per step, starting from zeros
    assert phis.shape == (STEPS, 78, 80) and phis[:, 77, :16].abs().max() > 0  # the pooled vector was optimised
    r = run_edit(xpipe, EditSettings(caption, targets=(caption.replace("square", "circle"),), steps=STEPS,
                                     guidance=5.0), inversion=inv["null-text"], progress=False)
    assert torch.allclose(r.z_0[0], reconstruct(xpipe, inv["null-text"], progress=False)[0], atol=1e-9)
