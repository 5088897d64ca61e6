"""Self-checks of the test-only reference `tests/reference_p2p.py` (the authors' controllers on diffusers processors).

Nothing here touches `p2p/`: the reference is checked against diffusers itself, against hand-computed mappers, and
against its own invariants, so that parity tests of our implementation against it mean something.
"""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor

from tests import reference_p2p as R
from tests.tiny import reference_pipeline

STEPS = 8
H = W = 64  # the tiny preset: 8x8 latents, UNet attention at 8x8 / 4x4 / 2x2, mid 1x1


@pytest.fixture(autouse=True)
def _one_thread():
    # The tiny networks gain nothing from intra-op threads, and several threads slow down badly (x10-x100) when the
    # machine is shared. Restored after each test.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe(clip_vocab_dir):
    return reference_pipeline(clip_vocab_dir)


@pytest.fixture(scope="module")
def tok(pipe):
    return pipe.tokenizer


def run(pipe, prompts, controller, seed=0, steps=STEPS, height=H, width=W, guidance=7.5):
    return R.text2image(pipe, prompts, controller, num_steps=steps, guidance_scale=guidance, seed=seed,
                        height=height, width=width, return_latents=True)


# ----------------------------------------------------------------------------------------------------------------------
# The hook and the sampling loop against plain diffusers
# ----------------------------------------------------------------------------------------------------------------------

def test_empty_control_equals_plain_diffusers_pipeline(pipe):
    prompts = ["a cat on a chair", "a photo of a house"]
    seed = 3
    images, traj = run(pipe, prompts, R.EmptyControl(), seed=seed)
    images_none, traj_none = run(pipe, prompts, None, seed=seed)
    assert images.shape == (2, H, W, 3) and images.dtype == np.uint8 and len(traj) == STEPS + 1
    assert torch.equal(traj[-1], traj_none[-1]) and np.array_equal(images, images_none)
    # the processors are restored afterwards
    assert not any(isinstance(p, R.P2PAttnProcessor) for p in pipe.unet.attn_processors.values())

    latent = torch.randn((1, 4, H // 8, W // 8), generator=torch.Generator("cpu").manual_seed(seed))
    assert torch.equal(traj[0][0], latent[0]) and torch.equal(traj[0][1], latent[0])
    pipe.scheduler = DDIMScheduler(**R.SD_V1_DDIM)
    kw = dict(height=H, width=W, num_inference_steps=STEPS, guidance_scale=7.5)
    previous = dict(pipe.unet.attn_processors)
    try:
        # diffusers' explicit attention (AttnProcessor: same baddbmm + softmax as our hook): bit-identical latents
        pipe.unet.set_attn_processor(AttnProcessor())
        lat = pipe(prompts, latents=latent.expand(2, -1, -1, -1).clone(), output_type="latent", **kw).images
        assert torch.equal(lat, traj[-1])
        img = pipe(prompts, latents=latent.expand(2, -1, -1, -1).clone(), output_type="np", **kw).images
        # the authors decode `1 / 0.18215 * x`, diffusers `x / 0.18215`: at most one grey level apart
        assert np.abs((img * 255).astype(np.uint8).astype(int) - images.astype(int)).max() <= 1
        # the default fused SDPA processors: same up to float rounding
        pipe.unet.set_attn_processor(dict(previous))
        lat = pipe(prompts, latents=latent.expand(2, -1, -1, -1).clone(), output_type="latent", **kw).images
        torch.testing.assert_close(lat, traj[-1], atol=1e-2, rtol=1e-2)
    finally:
        pipe.unet.set_attn_processor(dict(previous))


def test_store_records_conditional_maps(pipe, tok):
    prompts = ["a cat on a chair", "a dog on a chair"]
    store = R.AttentionStore()
    images, _ = run(pipe, prompts, store)
    images_empty, _ = run(pipe, prompts, R.EmptyControl())
    assert np.array_equal(images, images_empty)  # storing does not change anything
    assert store.num_att_layers == 32 and store.cur_step == STEPS and store.cur_att_layer == 0
    heads = 4
    queries = {"down": [64, 64, 16, 16, 4, 4], "mid": [1], "up": [4, 4, 4, 16, 16, 16, 64, 64, 64]}
    for place, ns in queries.items():
        for kind in ("cross", "self"):
            maps = store.get_average_attention()[f"{place}_{kind}"]
            assert [m.shape for m in maps] == [(2 * heads, n, 77 if kind == "cross" else n) for n in ns]
            for m in maps:  # average of softmax rows
                torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:2]))
    agg = R.aggregate_attention(store, 2, 4, ("up", "down"), True, 1)
    assert agg.shape == (4, 4, 77)
    by_hand = torch.stack([m.reshape(2, heads, 4, 4, 77)[1] for place in ("up", "down")
                           for m in store.get_average_attention()[f"{place}_cross"] if m.shape[1] == 16])
    torch.testing.assert_close(agg, by_hand.reshape(-1, 4, 4, 77).mean(0))
    # store cap: only maps with <= cap queries are kept
    small = R.AttentionStore(store_cap=4 ** 2)
    run(pipe, prompts, small, steps=2)
    assert [m.shape[1] for m in small.attention_store["up_self"]] == [4, 4, 4, 16, 16, 16]


# ----------------------------------------------------------------------------------------------------------------------
# Editing controllers end to end (against themselves)
# ----------------------------------------------------------------------------------------------------------------------

def test_replace_with_identical_prompts_reproduces_source(pipe, tok):
    prompts = ["a cat on a chair", "a cat on a chair"]
    ctrl = R.AttentionReplace(prompts, STEPS, 1.0, 1.0, tokenizer=tok, self_replace_cap=8 ** 2)
    images, traj = run(pipe, prompts, ctrl)
    assert torch.equal(ctrl.mapper[0], torch.eye(77))
    assert np.array_equal(images[1], images[0]) and torch.equal(traj[-1][1], traj[-1][0])


def test_edit_windows(pipe, tok):
    """Empty injection windows reproduce the unedited batch exactly; full windows change the edited image only; the
    self-attention cap restricts self injection to layers with few enough keys."""
    prompts = ["a cat on a chair", "a dog on a chair"]
    base, _ = run(pipe, prompts, R.EmptyControl())
    none, _ = run(pipe, prompts, R.AttentionReplace(prompts, STEPS, 0.0, 0.0, tokenizer=tok, self_replace_cap=64))
    assert np.array_equal(none, base)
    cross, _ = run(pipe, prompts, R.AttentionReplace(prompts, STEPS, 1.0, 0.0, tokenizer=tok))
    assert np.array_equal(cross[0], base[0]) and not np.array_equal(cross[1], base[1])
    # self injection only: cap 0 -> no layer qualifies -> same as no edit; cap 64 -> every self layer
    capped, _ = run(pipe, prompts, R.AttentionReplace(prompts, STEPS, 0.0, 1.0, tokenizer=tok, self_replace_cap=0))
    assert np.array_equal(capped, base)
    full, _ = run(pipe, prompts, R.AttentionReplace(prompts, STEPS, 0.0, 1.0, tokenizer=tok, self_replace_cap=64))
    assert np.array_equal(full[0], base[0]) and not np.array_equal(full[1], base[1])


def test_self_window_counts_steps(pipe, tok):
    """self_replace_steps=(s0, s1) injects at steps int(s0*N) <= k < int(s1*N); a window outside the run is a no-op."""
    prompts = ["a cat on a chair", "a dog on a chair"]
    ctrl = R.AttentionReplace(prompts, STEPS, 0.0, (0.25, 0.5), tokenizer=tok, self_replace_cap=64)
    assert ctrl.num_self_replace == (2, 4)
    _, traj = run(pipe, prompts, ctrl)
    _, traj_base = run(pipe, prompts, R.EmptyControl())
    for k in range(3):  # steps 0 and 1 are untouched: latents after them agree
        assert torch.equal(traj[k], traj_base[k])
    assert not torch.equal(traj[3][1], traj_base[3][1])


def test_refine_and_reweight_identities(pipe, tok):
    prompts = ["a castle", "children drawing of a castle"]
    refine, _ = run(pipe, prompts, R.AttentionRefine(prompts, STEPS, 0.8, 0.4, tokenizer=tok, self_replace_cap=64))
    base, _ = run(pipe, prompts, R.EmptyControl())
    assert np.array_equal(refine[0], base[0]) and not np.array_equal(refine[1], base[1])
    # reweighting by 1 chained on a refine is the refine itself
    eq = R.get_equalizer(prompts[1], ("drawing",), (1.0,), tok)
    chained = R.AttentionReweight(prompts, STEPS, 0.8, 0.4, eq, tokenizer=tok, self_replace_cap=64,
                                  controller=R.AttentionRefine(prompts, STEPS, 0.8, 0.4, tokenizer=tok))
    same, _ = run(pipe, prompts, chained)
    assert np.array_equal(same, refine)
    # reweighting identical prompts by 1 reproduces the source; by 5 it changes the edit
    twins = ["a smiling bunny doll"] * 2
    ones = R.get_equalizer(twins[1], ("smiling",), (1.0,), tok)
    img1, _ = run(pipe, twins, R.AttentionReweight(twins, STEPS, 1.0, 0.0, ones, tokenizer=tok))
    assert np.array_equal(img1[1], img1[0])
    five = R.get_equalizer(twins[1], ("smiling",), (5.0,), tok)
    img5, _ = run(pipe, twins, R.AttentionReweight(twins, STEPS, 1.0, 0.0, five, tokenizer=tok))
    assert np.array_equal(img5[0], img1[0]) and not np.array_equal(img5[1], img5[0])


def test_local_blend_end_to_end_three_prompts(pipe, tok):
    """LocalBlend with B=3 at 128x128 (4x4 maps): outside each step's mask every edited latent IS the source latent.

    Note: with random weights the cross maps are almost uniform, and at 2x2 maps (64x64 images) the 3x3 max-pool spreads
    the maximum everywhere, so the authors' threshold 0.3 gives an all-ones mask (no blending at all). A high threshold
    at 128x128 makes the mask non-trivial.
    """
    prompts = ["a cat on a chair", "a dog on a chair", "a fox on a chair"]
    vacuous = R.LocalBlend(prompts, ("cat", "dog", "fox"), tok)  # authors' threshold at 64x64
    run(pipe, prompts, R.AttentionReplace(prompts, STEPS, 0.8, 0.4, vacuous, tokenizer=tok))
    assert all(bool((m == 1).all()) for m in vacuous.masks)

    lb = R.LocalBlend(prompts, ("cat", "dog", "fox"), tok, threshold=0.95)
    ctrl = R.AttentionReplace(prompts, STEPS, 0.8, 0.4, lb, tokenizer=tok)
    _, traj = run(pipe, prompts, ctrl, height=128, width=128)
    assert len(lb.masks) == STEPS
    fractions = [float(m[1:].mean()) for m in lb.masks]
    assert any(0 < f < 1 for f in fractions), fractions
    for k, mask in enumerate(lb.masks):
        assert mask.shape == (3, 1, 16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert bool((mask[1:] >= mask[:1]).all())  # OR with the source's mask
        x = traj[k + 1]
        outside = (mask == 0).expand_as(x)
        for b in (1, 2):
            assert torch.equal(x[b][outside[b]], x[0][outside[b]])
    # the mask recomputed from the final running-sum store, written out by hand
    torch.testing.assert_close(lb.masks[-1], _mask_by_hand(ctrl.attention_store, lb.alpha_layers, (16, 16), 0.95))


def _mask_by_hand(store, alpha_layers, latent_hw, th):
    rh, rw = latent_hw[0] // 4, latent_hw[1] // 4
    b = alpha_layers.shape[0]
    sel = alpha_layers.reshape(b, -1).numpy()
    layers = [m.numpy() for key in ("down_cross", "up_cross") for m in store[key] if m.shape[1] == rh * rw]
    masks = []
    for i in range(b):
        per_map = [m.reshape(b, -1, rh * rw, 77)[i] @ sel[i] for m in layers]  # (heads, rh*rw) each
        avg = np.concatenate(per_map).mean(0).reshape(rh, rw)
        pooled = np.array([[avg[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].max() for c in range(rw)]
                           for r in range(rh)])
        up = np.repeat(np.repeat(pooled, latent_hw[0] // rh, 0), latent_hw[1] // rw, 1)
        with np.errstate(invalid="ignore"):  # an all-zero selection: 0/0, below any threshold
            masks.append(up / up.max() > th)
    masks = [masks[0] | m for m in masks]
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def _fake_store(maps_by_prompt, heads=2, distractors=True):
    """A store whose 4x4 cross maps are `maps_by_prompt[b]` (4, 4, 77), same for every head, in 2 down + 3 up layers."""
    b = len(maps_by_prompt)
    m = torch.stack([torch.as_tensor(x, dtype=torch.float32).reshape(16, 77) for x in maps_by_prompt])
    m = m[:, None].expand(b, heads, 16, 77).reshape(b * heads, 16, 77)
    other = torch.rand(b * heads, 64, 77)  # another resolution: must be ignored
    store = R.AttentionStore.get_empty_store()
    store["down_cross"] = ([other, other] if distractors else []) + [m.clone(), m.clone()]
    store["up_cross"] = [m.clone(), m.clone(), m.clone()] + ([other] if distractors else [])
    store["mid_cross"] = [torch.rand(b * heads, 4, 77)]
    return store


def test_local_blend_mask_on_synthetic_maps(tok):
    prompts = ["a cat on a chair", "a dog on a chair", "a fox on a chair"]
    cat, dog = R.get_word_inds(prompts[0], "cat", tok)[0], R.get_word_inds(prompts[1], "dog", tok)[0]
    maps = np.zeros((3, 4, 4, 77))
    maps[0, 3, 3, cat] = 1.0   # source word: bottom-right cell
    maps[1, 0, 0, dog] = 1.0   # edit word: top-left cell, strong
    maps[1, 3, 0, dog] = 0.2   # weak cell (< 0.3 after normalisation): ignored
    maps[1, 0, 3, dog] = 0.5   # medium cell: kept
    maps[1, 2, 2, 3] = 9.0     # a token that is not selected ('on'): ignored
    store = _fake_store(list(maps))
    lb = R.LocalBlend(prompts, ("cat", "dog", "fox"), tok)
    x = torch.randn(3, 4, 16, 16)
    out = lb(x, store)
    # 4x4 cells -> after 3x3 max-pool -> x4 nearest upsampling to 16x16
    src = np.zeros((4, 4), bool); src[2:, 2:] = True
    dog_cells = np.zeros((4, 4), bool); dog_cells[:2, :2] = True; dog_cells[:2, 2:] = True
    expected = np.stack([src, src | dog_cells, src])  # prompt 2 selects nothing -> only the source's mask
    expected = np.repeat(np.repeat(expected, 4, 1), 4, 2)[:, None]
    assert np.array_equal(lb.masks[-1].numpy().astype(bool), expected)
    m = torch.from_numpy(expected).float()
    torch.testing.assert_close(out, x[:1] + m * (x - x[:1]))
    torch.testing.assert_close(lb.masks[-1], _mask_by_hand(store, lb.alpha_layers, (16, 16), 0.3))

    # null-text extras: substract "chair" (no pooling), start blending after int(start_blend * num_steps) calls
    chair = [int(R.get_word_inds(p, "chair", tok)[0]) for p in prompts]
    maps[1, 0, 0, chair[1]] = 1.0
    lb = R.LocalBlend(prompts, ("cat", "dog", "fox"), tok, substruct_words=("chair",) * 3, start_blend=0.5,
                      num_steps=4)
    assert lb(x, _fake_store(list(maps))) is x and lb(x, _fake_store(list(maps))) is x and not lb.masks
    lb(x, _fake_store(list(maps)))
    sub = np.zeros((16, 16), bool); sub[:4, :4] = True  # unpooled single cell
    assert np.array_equal(lb.masks[-1].numpy()[1, 0].astype(bool), np.repeat(np.repeat(src | dog_cells, 4, 0), 4, 1)
                          & ~sub)


def test_local_blend_layers_are_the_authors_at_native_size():
    """At a 64x64 latent with the 32**2 store cap, "cross maps at latent/4" is the authors' down_cross[2:4] +
    up_cross[:3] (the five 16x16 layers)."""
    store = {"down_cross": [torch.zeros(2, n, 77) for n in (1024, 1024, 256, 256)],
             "mid_cross": [torch.zeros(2, 64, 77)],
             "up_cross": [torch.zeros(2, n, 77) for n in (256, 256, 256, 1024, 1024, 1024)]}
    picked = R.LocalBlend.select_maps(store, (64, 64))
    authors = store["down_cross"][2:4] + store["up_cross"][:3]
    assert len(picked) == 5 and all(a is b for a, b in zip(picked, authors))


# ----------------------------------------------------------------------------------------------------------------------
# Token helpers and mappers (hand-computed)
# ----------------------------------------------------------------------------------------------------------------------

def test_get_word_inds(tok):
    text = "a tyrannosaurus on a chair"
    # BOS a | tyran no saurus | on a chair EOS
    assert tok.encode(text) == [49406, 320, 46921, 578, 22118, 525, 320, 4269, 49407]
    assert R.get_word_inds(text, "tyrannosaurus", tok).tolist() == [2, 3, 4]
    assert R.get_word_inds(text, 1, tok).tolist() == [2, 3, 4]
    assert R.get_word_inds(text, "a", tok).tolist() == [1, 6]
    assert R.get_word_inds(text, "chair", tok).tolist() == [7]
    assert R.get_word_inds(text, "dog", tok).tolist() == []


def test_authors_replacement_mapper_misaligns_after_a_longer_word(tok):
    """ "a cat on a chair" -> "a tyrannosaurus on a chair": 'cat' is 1 token, 'tyrannosaurus' 3 (tyran|no|saurus).

    source tokens: 0 BOS, 1 a, 2 cat, 3 on, 4 a, 5 chair, 6 EOS, 7.. padding (EOS)
    target tokens: 0 BOS, 1 a, 2 tyran, 3 no, 4 saurus, 5 on, 6 a, 7 chair, 8 EOS, 9.. padding
    A correct mapper has A[3, 5] = A[4, 6] = A[5, 7] = A[6, 8] = 1 (target j <- source j - 2 after the swap).
    The authors' tail writes A[j, j] = 1 for j >= 5 instead, so
      * rows 3 ('on') and 4 ('a') are all zero: those source maps are used nowhere;
      * target 5 'on' takes source 5 'chair', target 6 'a' takes source 6 EOS, target 7 'chair' takes source 7
        (padding), target 8 EOS takes source 8 (padding), ... every later target column j takes source row j.
    """
    src, tgt = "a cat on a chair", "a tyrannosaurus on a chair"
    assert len(tok.encode(tgt)) - len(tok.encode(src)) == 2
    a = R.authors_replacement_mapper(src, tgt, tok)
    expected = torch.zeros(77, 77)
    expected[0, 0] = expected[1, 1] = 1
    expected[2, 2:5] = 1 / 3  # 1 -> 3 tokens: spread over the three target tokens
    for j in range(5, 77):
        expected[j, j] = 1  # the bug
    assert torch.equal(a, expected)
    assert a[3].sum() == 0 and a[4].sum() == 0
    assert a[5, 5] == 1 and a[3, 5] == 0 and a[5, 7] == 0 and a[6, 6] == 1
    # stacked version used by AttentionReplace
    assert torch.equal(R.get_replacement_mapper([src, tgt, src], tok), torch.stack([a, torch.eye(77)]))


def test_replacement_mapper_same_token_count_is_identity(tok):
    assert torch.equal(R.authors_replacement_mapper("a cat on a chair", "a dog on a chair", tok), torch.eye(77))
    with pytest.raises(ValueError):
        R.authors_replacement_mapper("a cat", "a big dog", tok)


def test_refinement_mapper_castle(tok):
    """ "a castle" [BOS a castle EOS] -> "children drawing of a castle" [BOS children drawing of a castle EOS]."""
    mapper, alphas = R.get_refinement_mapper(["a castle", "children drawing of a castle"], tok)
    assert mapper.shape == alphas.shape == (1, 77) and mapper.dtype == torch.int64
    assert mapper[0, :7].tolist() == [0, -1, -1, -1, 1, 2, 3]
    assert mapper[0, 7:].tolist() == list(range(7, 77))
    assert alphas[0, :7].tolist() == [1, 0, 0, 0, 1, 1, 1] and bool((alphas[0, 7:] == 1).all())


def test_refinement_mapper_winter(tok):
    src, tgt = "a photo of a house on a mountain", "a photo of a house on a mountain at winter"
    mapper, alphas = R.get_refinement_mapper([src, tgt, tgt], tok)
    assert mapper.shape == (2, 77)
    expected = list(range(9)) + [-1, -1, 9] + list(range(12, 77))  # 'at' (9), 'winter' (10) are new; EOS 11 <- 9
    assert mapper[0].tolist() == expected and mapper[1].tolist() == expected
    assert alphas[0].tolist() == [1.0] * 9 + [0.0, 0.0] + [1.0] * 66


def test_time_words_alpha(tok):
    prompts = ["a squirrel eating a burger", "a lion eating a burger"]
    a = R.get_time_words_attention_alpha(prompts, 50, 0.8, tok)
    assert a.shape == (51, 1, 1, 1, 77)
    assert bool((a[:40] == 1).all()) and bool((a[40:] == 0).all())  # int(0.8 * 51) = 40
    steps = {"default_": 1.0, "lion": 0.4}
    a = R.get_time_words_attention_alpha(prompts, 50, steps, tok)
    assert steps == {"default_": 1.0, "lion": 0.4}  # not mutated
    lion = 2
    assert bool((a[:20, 0, 0, 0, lion] == 1).all()) and bool((a[20:, 0, 0, 0, lion] == 0).all())  # int(.4 * 51) = 20
    others = torch.cat([a[..., :lion], a[..., lion + 1:]], -1)
    assert bool((others == 1).all())
    a = R.get_time_words_attention_alpha(prompts, 10, (0.2, 0.6), tok)
    assert a[:, 0, 0, 0, 0].tolist() == [0, 0] + [1] * 4 + [0] * 5  # int(.2*11)=2, int(.6*11)=6


def test_equalizer(tok):
    eq = R.get_equalizer("a tyrannosaurus on a chair", ("tyrannosaurus",), (5.0,), tok)
    expected = torch.ones(1, 77)
    expected[0, 2:5] = 5
    assert torch.equal(eq, expected)
    eq = R.get_equalizer("a smiling bunny doll", "smiling", (0.5, 0.0, -0.5), tok)  # one row per edited prompt
    assert eq.shape == (3, 77) and eq[:, 2].tolist() == [0.5, 0.0, -0.5] and float(eq[:, [0, 1, 3]].min()) == 1
    eq = R.get_equalizer_per_word("a silver cat sculpture", ("silver", "sculpture"), (2.0, 3.0), tok)
    assert eq.shape == (1, 77) and eq[0, 2] == 2 and eq[0, 4] == 3 and eq[0, 3] == 1
