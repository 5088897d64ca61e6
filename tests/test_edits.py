"""Prompt-to-Prompt controllers: hand-built maps with results computed here, and end-to-end properties."""
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.attention import Site
from models.tokenizer import CLIPTokenizer
from p2p.core.align import refine_mapper, replace_mapper
from p2p.core.local_blend import LocalBlend
from p2p.core.store import AttentionStore
from p2p.core.controller import Compose, Controller, GuidanceLayout, step_range
from p2p.core.sites import SiteSelection
from p2p.core.settings import EditSettings, build_controller
from p2p.core.run import run_edit
from p2p.core.attention_edit import AttentionEdit, Refine, Replace, Reweight, cross_schedule
from p2p.core.pipeline import Pipeline

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "edits"
BLEND16 = SiteSelection(kinds=("cross",), res=(16,))
BLEND2 = SiteSelection(kinds=("cross",), res=(2,))
CROSS16 = Site("down_blocks.2.attentions.0.transformer_blocks.0.attn2", "down", "cross", 2, 16, 9, 4)
SELF16 = Site("down_blocks.2.attentions.0.transformer_blocks.0.attn1", "down", "self", 2, 16, 8, 4)
SELF32 = Site("down_blocks.1.attentions.0.transformer_blocks.0.attn1", "down", "self", 1, 32, 4, 2)


@pytest.fixture(scope="module")
def tok(clip_vocab_dir):
    return CLIPTokenizer.from_path(clip_vocab_dir)


@pytest.fixture(scope="module")
def pipe(tok):
    return Pipeline.from_config("tiny", tok, seed=0)


def softmax_maps(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).softmax(-1)


# --- schedules ----------------------------------------------------------------------------------------

def test_cross_schedule_follows_the_authors_rounding(tok):
    prompts = ["a painting of a squirrel eating a burger", "a painting of a lion eating a burger"]
    alpha = cross_schedule(tok, prompts, 50, 0.8)
    assert alpha.shape == (50, 1, 77)
    assert (alpha[:40] == 1).all() and (alpha[40:] == 0).all()  # int(0.8 * 51) = 40 steps
    alpha = cross_schedule(tok, prompts, 50, {"default_": 1.0, "lion": 0.4})
    lion = tok.word_token_indices(prompts[1], "lion")
    others = [j for j in range(77) if j not in lion]
    assert (alpha[:, 0, others] == 1).all()
    assert (alpha[:20, 0, lion] == 1).all() and (alpha[20:, 0, lion] == 0).all()  # int(0.4 * 51) = 20
    alpha = cross_schedule(tok, prompts, 50, (0.2, 0.6))
    assert alpha[:, 0, 0].tolist() == [0.0] * 10 + [1.0] * 20 + [0.0] * 20  # int(.2*51)=10 .. int(.6*51)=30


def test_step_range_keeps_the_authors_two_roundings():
    assert step_range(0.4, 50) == (0, 20) and step_range((0.1, 0.5), 50) == (5, 25) and step_range(1.0, 7) == (0, 7)
    # cross-attention: N + 1 rows; 0.25 of 10 steps is int(2.75) = 2 steps, not int(2.5) = 2 ... and 0.5 of 9
    # is int(5.0) = 5 where int(0.5 * 9) = 4
    assert step_range(0.5, 9, cross_attention=True) == (0, 5) and step_range(0.5, 9) == (0, 4)


# --- edit functions on hand-built maps -----------------------------------------------------------------

def test_replace_moves_source_maps_through_the_mapper(tok):
    A = replace_mapper(tok, "a cat on a chair", "a tyrannosaurus on a chair")[None]
    base, rep = softmax_maps(2, 5, 77), softmax_maps(1, 2, 5, 77, seed=1)
    out = Replace(A)(base, rep)
    expected = torch.zeros_like(rep)
    for j in range(77):
        for i in range(77):
            expected[0, :, :, j] += base[:, :, i] * A[0, i, j]
    assert torch.allclose(out, expected, atol=1e-6)
    # target 'on' (5) carries source 'on' (3); the three tyrannosaurus tokens a third of 'cat' (2) each
    assert torch.allclose(out[0, ..., 5], base[..., 3]) and torch.allclose(out[0, ..., 3], base[..., 2] / 3)
    # each source token's mass lands once; only the last two padding positions fall off the end
    assert torch.allclose(out.sum(-1)[0], 1 - base[..., 75:].sum(-1), atol=1e-5)


def test_refine_keeps_new_tokens_and_moves_aligned_ones(tok):
    mapper, alphas = refine_mapper(tok, "a castle", "children drawing of a castle")
    base, rep = softmax_maps(2, 5, 77), softmax_maps(1, 2, 5, 77, seed=1)
    out = Refine(mapper[None], alphas[None])(base, rep)
    for j in range(77):
        expected = base[..., mapper[j]] if alphas[j] == 1 else rep[0, ..., j]
        assert torch.equal(out[0, ..., j], expected)
    assert torch.equal(out[0, ..., 5], base[..., 2])  # 'castle' at 5 in the target, 2 in the source


def test_reweight_chained_on_replace(tok):
    A = replace_mapper(tok, "a cat on a chair", "a dog on a chair")[None]
    eq = torch.ones(1, 77)
    eq[0, 2] = -2.0
    base, rep = softmax_maps(2, 5, 77), softmax_maps(1, 2, 5, 77, seed=1)
    out = Reweight(eq, Replace(A))(base, rep)
    assert torch.allclose(out[0, ..., 2], -2 * base[..., 2]) and torch.allclose(out[0, ..., 3], base[..., 3])
    assert torch.equal(Reweight(torch.ones(1, 77))(base, rep)[0], base)  # c = 1 alone: the source maps


# --- the AttentionEdit controller -------------------------------------------------------------------------------

def make_edit(tok, steps=10, **kw):
    prompts = ["a cat on a chair", "a dog on a chair"]
    schedule = cross_schedule(tok, prompts, steps, kw.pop("cross", 0.5))
    ctl = AttentionEdit(Replace(replace_mapper(tok, *prompts)[None]), schedule, kw.pop("self", 0.3), **kw)
    ctl.begin_sampling(steps)
    return ctl


def test_edit_touches_only_the_conditional_edited_rows(tok):
    ctl = make_edit(tok)
    M = softmax_maps(4, 2, 256, 77)  # [uncond src, uncond tgt, cond src, cond tgt]
    before = M.clone()
    ctl.begin_step(2, 801, GuidanceLayout.batched(2))
    assert ctl.wants_map(CROSS16, (16, 16))
    out = ctl.on_map(M, CROSS16, (16, 16))
    assert torch.equal(M, before)  # the caller's tensor is left alone
    assert torch.equal(out[:3], M[:3])  # unconditional rows and the source row unchanged
    assert torch.allclose(out[3], M[2])  # cat -> dog is one token: the mapper is the identity
    ctl.begin_step(6, 401, GuidanceLayout.batched(2))  # past int(0.5 * 11) = 5: no injection, map not wanted
    assert not ctl.wants_map(CROSS16, (16, 16))


def test_self_injection_window_and_key_cap(tok):
    ctl = make_edit(tok)  # self window: steps 0..2
    ctl.begin_step(1, 901, GuidanceLayout.batched(2))
    assert ctl.wants_map(SELF16, (16, 16)) and not ctl.wants_map(SELF32, (32, 32))  # authors' cap: <= 16 x 16 keys
    M = softmax_maps(4, 2, 256, 256)
    out = ctl.on_map(M, SELF16, (16, 16))
    assert torch.equal(out[3], M[2]) and torch.equal(out[:3], M[:3])
    ctl.begin_step(3, 701, GuidanceLayout.batched(2))
    assert not ctl.wants_map(SELF16, (16, 16))
    uncapped = make_edit(tok, self_sites=SiteSelection())
    uncapped.begin_step(1, 901, GuidanceLayout.batched(2))
    assert uncapped.wants_map(SELF32, (32, 32))


def test_low_memory_layout_edits_the_conditional_call_only(tok):
    ctl = make_edit(tok)
    ctl.begin_step(0, 981, GuidanceLayout(2, slice(0, 2), None))
    assert not ctl.wants_map(CROSS16, (16, 16))  # the unconditional call runs fused, untouched
    ctl.begin_step(0, 981, GuidanceLayout(2, None, slice(0, 2)))
    M = softmax_maps(2, 2, 256, 77)
    assert torch.allclose(ctl.on_map(M, CROSS16, (16, 16))[1], M[0])


def test_site_selection_restricts_injection(tok):
    ctl = make_edit(tok, cross_sites=SiteSelection(res=(8,)), self_sites=SiteSelection(places=("up",)))
    ctl.begin_step(0, 981, GuidanceLayout.batched(2))
    assert not ctl.wants_map(CROSS16, (16, 16)) and not ctl.wants_map(SELF16, (16, 16))
    assert ctl.wants_map(replace(CROSS16, res=8), (8, 8)) and ctl.wants_map(replace(SELF16, place="up"), (16, 16))


def test_edit_refuses_a_sampler_it_was_not_built_for(tok):
    ctl = make_edit(tok, steps=10)
    with pytest.raises(ValueError, match="built for 10 steps; the sampler runs 11"):
        ctl.begin_sampling(11)
    with pytest.raises(ValueError, match="built for 2 prompts, the batch has 3"):
        ctl.begin_step(0, 981, GuidanceLayout.batched(3))


# --- the attention store --------------------------------------------------------------------------------

def test_store_averages_over_steps_and_heads_in_constant_memory():
    store = AttentionStore()
    store.begin_sampling(5)
    maps = [softmax_maps(4, 2, 256, 77, seed=s) for s in range(5)]
    for step, M in enumerate(maps):
        store.begin_step(step, 981 - 20 * step, GuidanceLayout.batched(2))
        assert store.wants_map(CROSS16, (16, 16)) and not store.wants_map(CROSS16, (64, 64))  # authors' cap: <= 32 x 32
        store.on_map(M, CROSS16, (16, 16))
        assert len(store.sums) == 1
    expected = torch.stack([M[2:].mean(1) for M in maps]).mean(0).reshape(2, 16, 16, 77)
    assert torch.allclose(store.average(CROSS16), expected, atol=1e-6)
    assert torch.allclose(store.aggregate("cross", SiteSelection(res=(16,), places=("down",))), expected, atol=1e-6)
    with pytest.raises(ValueError, match="no stored maps of self-attention"):
        store.aggregate("self")


# --- local blend ---------------------------------------------------------------------------------------

def blend_mask_by_hand(layers, words, latent, threshold):
    """The authors' recipe in numpy: sum over words' tokens, mean over layers, 3x3 max-pool, nearest
    upsample, divide by the max, threshold, OR with the source's mask."""
    m = np.mean([(l * words[:, None, None, :]).sum(-1) for l in layers], axis=0)  # (B, h, w)
    B, h, w = m.shape
    padded = np.pad(m, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    pooled = np.max([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)
    up = pooled.repeat(latent // h, axis=1).repeat(latent // w, axis=2)
    up = up / up.max(axis=(1, 2), keepdims=True)
    mask = up > threshold
    return mask[:1] | mask


def test_local_blend_mask_and_blend(tok):
    prompts = ["a cat on a chair", "a dog on a chair"]
    blend = LocalBlend(tok, prompts, ["cat", "dog"], sites=BLEND16)
    blend.begin_sampling(10)
    # the source's 'cat' (token 2) attends in a patch at the top left, the edit's 'dog' at the bottom right
    layers = []
    for s_ in range(3):
        logits = torch.randn(4, 8, 16, 16, 77, generator=torch.Generator().manual_seed(s_))
        logits[2, :, 2:6, 1:5, 2] += 5
        logits[3, :, 9:13, 10:15, 2] += 5
        layers.append(logits.reshape(4, 8, 256, 77).softmax(-1))
    sites = [replace(CROSS16, name=f"x{i}", index=i) for i in range(3)]
    blend.begin_step(0, 981, GuidanceLayout.batched(2))
    for site, M in zip(sites, layers):
        assert blend.wants_map(site, (16, 16))
        blend.on_map(M, site, (16, 16))
    words = np.zeros((2, 77))
    words[0, tok.word_token_indices(prompts[0], "cat")] = 1
    words[1, tok.word_token_indices(prompts[1], "dog")] = 1
    heads_mean = [M[2:].mean(1).reshape(2, 16, 16, 77).numpy() for M in layers]
    expected = blend_mask_by_hand(heads_mean, words, 64, 0.3)
    got = blend.mask((64, 64))[:, 0].bool().numpy()
    assert got.any() and not got.all()
    assert (got == expected).all()
    z = torch.randn(2, 4, 64, 64)
    out = blend.end_step(0, z)
    outside = torch.from_numpy(~got[1])
    assert torch.equal(out[1][:, outside], z[0][:, outside])  # exactly the source outside
    assert torch.allclose(out[1][:, ~outside], z[1][:, ~outside], atol=1e-6)


# --- end to end on tiny random weights ----------------------------------------------------------------

def tiny(prompt, targets, **kw):
    kw = {"steps": 6, "height": 64, "width": 64, **kw}
    return EditSettings(prompt, targets=tuple(targets), **kw)


def test_identical_prompts_with_full_injection_give_the_source(pipe):
    s = tiny("a red cube on a table", ["a red cube on a table"], cross_replace=1.0, self_replace=1.0,
             self_sites=SiteSelection())
    r = run_edit(pipe, s, progress=False)
    assert torch.equal(r.z_0[0], r.z_0[1])


def test_reweight_with_c_1_changes_nothing(pipe):
    base = run_edit(pipe, tiny("a cat on a chair", ["a dog on a chair"]), progress=False)
    same = run_edit(pipe, tiny("a cat on a chair", ["a dog on a chair"], reweight={"dog": 1.0}), progress=False)
    assert torch.equal(base.z_0, same.z_0)
    fader = run_edit(pipe, tiny("a cat on a chair", [], mode="reweight", reweight={"cat": 1.0},
                                cross_replace=1.0, self_replace=1.0, self_sites=SiteSelection()), progress=False)
    assert torch.equal(fader.z_0[0], fader.z_0[1])


def test_controller_asking_for_nothing_is_bit_identical_to_none(pipe):
    s = tiny("a cat on a chair", ["a dog on a chair"], cross_replace=0.0, self_replace=0.0)
    ctl = build_controller(s, pipe.tokenizer, 6)
    cond, uncond = pipe.encode_text(s.prompts), pipe.encode_text([""])
    z_T = pipe.initial_latent(0, 64, 64)
    with_ctl = pipe.denoise(z_T, cond, uncond, steps=6, guidance=7.5, controller=ctl, progress=False)
    plain = pipe.denoise(z_T, cond, uncond, steps=6, guidance=7.5, progress=False)
    assert torch.equal(with_ctl, plain)


def test_injection_fraction_0_equals_plain_generation_of_the_target(pipe):
    r = run_edit(pipe, tiny("a cat on a chair", ["a dog on a chair"], cross_replace=0.0, self_replace=0.0),
                 progress=False)
    (alone,) = pipe.generate("a dog on a chair", seed=0, steps=6, height=64, width=64, progress=False)
    assert np.abs(np.asarray(r.images[1], float) - np.asarray(alone, float)).mean() <= 1.0
    (source,) = pipe.generate("a cat on a chair", seed=0, steps=6, height=64, width=64, progress=False)
    assert np.abs(np.asarray(r.images[0], float) - np.asarray(source, float)).mean() <= 1.0  # = p2p generate


class Recording(LocalBlend):
    def end_step(self, step, z_t):
        out = super().end_step(step, z_t)
        self.seen = getattr(self, "seen", []) + [(out, self.mask(tuple(z_t.shape[-2:])))]
        return out


def test_local_blend_keeps_the_source_latent_outside_the_mask_at_every_step(pipe):
    # 128 px: 4x4 maps at the tiny model's blend level; random weights attend almost uniformly, so a
    # high threshold is needed for a mask that is not everything
    s = tiny("a cat on a chair", ["a dog on a chair"])
    rec = Recording(pipe.tokenizer, s.prompts, ["cat", "dog"], sites=BLEND2, threshold=0.95)
    ctl = Compose(build_controller(s, pipe.tokenizer, 6, model=pipe.cfg), rec)
    cond, uncond = pipe.encode_text(s.prompts), pipe.encode_text([""])
    pipe.denoise(pipe.initial_latent(0, 128, 128), cond, uncond, steps=6, guidance=7.5, controller=ctl, progress=False)
    assert len(rec.seen) == 6
    for z, mask in rec.seen:
        assert mask[1].sum() < mask[1].numel()  # something is outside
        assert torch.equal(((1 - mask[1]) * (z[1] - z[0])).abs().max(), torch.tensor(0.0))


# Batch composition changes float rounding, and this random-weight model under guidance 7.5 amplifies
# such differences about tenfold per step (plain generation too), so these compare after 2 steps.

def test_several_edits_in_one_batch_equal_separate_edits(pipe):
    both = run_edit(pipe, tiny("a cat on a chair", ["a dog on a chair", "a tyrannosaurus on a chair"], steps=2),
                    progress=False)
    one = run_edit(pipe, tiny("a cat on a chair", ["a tyrannosaurus on a chair"], steps=2), progress=False)
    assert (both.z_0[2] - one.z_0[1]).abs().max() <= 1e-4 * one.z_0.abs().max()


def test_low_memory_edit_equals_batched(pipe):
    s = tiny("a cat on a chair", ["a dog on a chair"], blend=("cat", "dog"), blend_sites=BLEND2, steps=2,
             height=128, width=128)  # 4x4 maps at the blend level: a 2x2 grid is refused (test below)
    a, b = run_edit(pipe, s, progress=False), run_edit(pipe, replace(s, low_memory=True), progress=False)
    assert (a.z_0 - b.z_0).abs().max() <= 1e-4 * a.z_0.abs().max()


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,message", [
    (dict(targets=("a big dog on a chair",)), "same number of words.*use mode='refine'"),
    (dict(blend=("horse",)), "local blend word 'horse' is in none of the prompts"),
    (dict(reweight={"horse": 2.0}), "reweight word 'horse' is in none of the prompts 'a dog on a chair'"),
    (dict(cross_replace=1.5), r"cross_replace must be a fraction of the steps in \[0, 1\]"),
    (dict(self_replace=(0.5, 0.2)), "self_replace must be"),
    (dict(cross_replace={"default_": 0.8, "horse": 0.2}), "cross_replace word 'horse' is in none of the prompts"),
    (dict(targets=("a dog on a chair " + "very " * 80,)), "more than the 77 the text encoder takes"),
    (dict(mode="swap"), "unknown edit mode 'swap'"),
    (dict(mode="reweight"), "mode 'reweight' needs words to reweight"),
    (dict(targets=()), "needs at least one target prompt"),
])
def test_bad_settings_are_named(tok, settings, message):
    s = EditSettings("a cat on a chair", **{"targets": ("a dog on a chair",), **settings})
    with pytest.raises(ValueError, match=message):
        build_controller(s, tok, 50)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_edit_configs_build(tok, path):
    s = EditSettings.from_toml(path)
    ctl = build_controller(s, tok, 50)
    edit = ctl.controllers[0] if isinstance(ctl, Compose) else ctl
    assert edit.schedule.shape == (50, len(s.prompts) - 1, 77)
