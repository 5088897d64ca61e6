"""Formulas checked where a plausible wrong formula gives a different answer (issue 14, section 5).

The habit: a test of a formula uses values where the wrong formula gives a different answer. The expected
values come from an independent reference, a hand computation written here or diffusers' DDIMScheduler,
never from our own output saved earlier. Each test names the wrong formula it tells apart from the right one.
"""
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from models.attention import Site
from models.ddim import DDIM, DDIMConfig
from models.tokenizer import CLIPTokenizer
from p2p.core.attention_edit import cross_schedule
from p2p.core.controller import GuidanceLayout
from p2p.core.inversion import null_text_optimisation
from p2p.core.local_blend import LocalBlend, threshold_mask
from p2p.core.sites import SiteSelection

CROSS16 = Site("down_blocks.2.attentions.0.transformer_blocks.0.attn2", "down", "cross", 2, 16, 9, 4)


@pytest.fixture(scope="module")
def tok(clip_vocab_dir):
    return CLIPTokenizer.from_path(clip_vocab_dir)


# --- (a) the cross-attention schedule: int(f (N + 1)), not int(f N) ------------------------------------------

def steps_on(column: torch.Tensor) -> list[int]:
    return [i for i, v in enumerate(column.tolist()) if v == 1]


def test_cross_schedule_rounds_with_n_plus_1(tok):
    """Catches cross_schedule rounding the window as int(f N) instead of the authors' int(f (N + 1)).

    N = 9 steps: the authors build N + 1 = 10 rows, so 0.5 covers int(5.0) = 5 steps (int(4.5) = 4 would be
    wrong), and the window (0.2, 0.7) covers steps int(2.0) = 2 .. int(7.0) = 7 (wrong: int(1.8) = 1 .. int(6.3) = 6).
    """
    prompts = ["a painting of a squirrel eating a burger", "a painting of a lion eating a burger"]
    N = 9
    alpha = cross_schedule(tok, prompts, N, 0.5)
    assert alpha.shape == (N, 1, 77)
    for j in (0, 5, 76):
        assert steps_on(alpha[:, 0, j]) == [0, 1, 2, 3, 4]

    lion = tok.word_token_indices(prompts[1], "lion")
    others = [j for j in range(77) if j not in lion]
    alpha = cross_schedule(tok, prompts, N, {"default_": 1.0, "lion": 0.5})
    assert (alpha[:, 0, others] == 1).all()  # 1.0: every step (int(10) = 10 rows, cut to the 9 steps)
    for j in lion:
        assert steps_on(alpha[:, 0, j]) == [0, 1, 2, 3, 4]

    alpha = cross_schedule(tok, prompts, N, {"default_": (0.2, 0.7), "lion": (0.0, 0.3)})
    assert steps_on(alpha[:, 0, others[0]]) == [2, 3, 4, 5, 6]  # wrong rule: [1, 2, 3, 4, 5]
    for j in lion:
        assert steps_on(alpha[:, 0, j]) == [0, 1, 2]  # int(0.3 * 10) = 3; wrong rule: int(2.7) = 2


# --- (b) the local-blend threshold is strict: a cell equal to k is out ---------------------------------------

def test_threshold_mask_leaves_a_cell_equal_to_the_threshold_out():
    """Catches threshold_mask's `m > k` turned into `m >= k` (without pooling, as the subtract mask).

    Maxima 4 and 1; cells of normalised value exactly k (1/4, 1/2: exact in float, and float32(0.3) / 1) are out.
    """
    maps = torch.zeros(1, 2, 4, 4, 77)  # (layers, B, h, w, 77); word token 2 in both prompts
    words = torch.zeros(2, 77)
    words[:, 2] = 1
    maps[0, 0, 0, 0, 2] = 4.0    # the source's maximum
    maps[0, 0, 1, 1, 2] = 1.0    # 1/4 of it
    maps[0, 0, 2, 2, 2] = 2.0    # 1/2 of it
    maps[0, 1, 3, 3, 2] = 1.0    # the edit's maximum
    maps[0, 1, 3, 0, 2] = torch.tensor(0.3, dtype=torch.float32)  # float32(0.3) / 1 = float32(0.3)
    maps[0, 1, 0, 3, 7] = 5.0    # another token: not in the words, ignored

    def cells(mask):
        return sorted(map(tuple, torch.nonzero(mask[0]).tolist()))

    got = threshold_mask(maps, words, (4, 4), pool=False, threshold=0.25)
    assert got.shape == (2, 1, 4, 4) and got.dtype == torch.bool
    assert cells(got[0]) == [(0, 0), (2, 2)]  # (1, 1) equals 1/4: out
    assert cells(got[1]) == [(0, 0), (2, 2), (3, 0), (3, 3)]  # its own 0.3 > 0.25, and the source's mask
    got = threshold_mask(maps, words, (4, 4), pool=False, threshold=0.5)
    assert cells(got[0]) == [(0, 0)]  # (2, 2) equals 1/2: out
    assert cells(got[1]) == [(0, 0), (3, 3)]
    got = threshold_mask(maps, words, (4, 4), pool=False, threshold=0.3)  # the default k
    assert cells(got[1]) == [(0, 0), (2, 2), (3, 3)]  # (3, 0) equals float32(0.3): out


def box(rows, cols, side=16):
    m = torch.zeros(side, side, dtype=torch.bool)
    m[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return m


def test_local_blend_mask_leaves_cells_equal_to_the_threshold_out(tok):
    """Catches the local-blend threshold `>` turned into `>=`, through LocalBlend fed maps as a store.

    16 x 16 maps of one site, one step, two equal heads. Source 'cat': 4 at (2, 2), 1 at (12, 12); edit 'dog':
    2 at (2, 12), 0.5 at (12, 2). After the 3 x 3 max-pool each peak is a 3 x 3 box; normalised by the maximum,
    the small peaks' boxes are exactly k = 1/4 and stay out. Upsampled x 4 (nearest) to the 64 x 64 latent.
    """
    prompts = ["a cat on a chair", "a dog on a chair"]
    blend = LocalBlend(tok, prompts, ["cat", "dog"], threshold=0.25, sites=SiteSelection(kinds=("cross",), res=(16,)))
    cat, dog = tok.word_token_indices(prompts[0], "cat"), tok.word_token_indices(prompts[1], "dog")
    assert len(cat) == 1 and len(dog) == 1
    M = torch.zeros(4, 2, 16, 16, 77)  # [uncond src, uncond tgt, cond src, cond tgt]
    M[0:2] = 9.0  # unconditional rows: never read
    M[2, :, 2, 2, cat[0]], M[2, :, 12, 12, cat[0]] = 4.0, 1.0
    M[3, :, 2, 12, dog[0]], M[3, :, 12, 2, dog[0]] = 2.0, 0.5
    blend.begin_sampling(10)
    blend.begin_step(0, 901, GuidanceLayout.batched(2))
    assert blend.wants_map(CROSS16, (16, 16))
    blend.on_map(M.reshape(4, 2, 256, 77), CROSS16, (16, 16))

    src = box((1, 3), (1, 3))
    expected = torch.stack([src, src | box((1, 3), (11, 13))])
    expected = expected.repeat_interleave(4, 1).repeat_interleave(4, 2)  # nearest upsampling to 64 x 64
    got = blend.mask((64, 64))
    assert got.shape == (2, 1, 64, 64)
    wrong = torch.nonzero(got[:, 0].bool() != expected).tolist()
    assert not wrong, f"{len(wrong)} cells differ from the hand-made mask, e.g. (prompt, y, x) = {wrong[:4]}"


# --- (c) null-text's early stop: the threshold on the step index rescaled to 50 steps ------------------------

class LossPipe:
    """Just what null_text_optimisation uses of a pipeline, with a UNet whose eps is 0 (but depends on the
    embedding, so that the loss has a gradient, zero): from z = 0 every DDIM step lands on 0, so the loss of
    step i is mean(target_i^2), set here to a chosen value."""

    dtype = torch.float32

    def __init__(self):
        self.ddim = DDIM()

    def unet(self, z, t, emb):
        return torch.zeros_like(z) + 0.0 * emb.float().sum()

    def predict(self, z, t, emb, controller=None):
        return self.unet(z, t, emb)


def run_null_text(losses, inner_steps=3):
    N = len(losses)
    shape = (1, 4, 2, 2)
    trajectory = [torch.full(shape, math.sqrt(losses[N - 1 - k])) for k in range(N)] + [torch.zeros(shape)]
    _, stats = null_text_optimisation(LossPipe(), trajectory, torch.zeros(1, 77, 8), torch.zeros(1, 77, 8), N,
                                      7.5, inner_steps=inner_steps, early_stop=1e-5, progress=False)
    assert stats["losses"] == pytest.approx(losses, rel=1e-5)  # the construction gives the chosen losses
    return stats["iterations"]


def test_null_text_early_stop_uses_the_step_index_on_50_steps():
    """Catches the early-stop threshold 1e-5 + 2e-5 s computed with the raw step index i instead of s = 50 i / N.

    N = 10: s = 5 i, so step i stops after one iteration when its loss is below 1e-5 + 1e-4 i (the raw index
    would give 1e-5 + 2e-5 i, under every loss below but at steps 0 and 5).
    """
    losses = [5e-6, 6e-5, 1.5e-4, 5e-4, 3e-4, 1e-6, 1e-3, 5e-4, 7e-4, 9.5e-4]
    # thresholds 1e-5 + 1e-4 i:  1e-5, 1.1e-4, 2.1e-4, 3.1e-4, 4.1e-4, 5.1e-4, 6.1e-4, 7.1e-4, 8.1e-4, 9.1e-4
    assert run_null_text(losses) == [1, 1, 1, 3, 1, 1, 3, 1, 1, 3]


def test_null_text_early_stop_on_more_than_50_steps():
    """The same bug the other way round: N = 100, s = i / 2, threshold 1e-5 + 1e-5 i; losses 1e-5 + 1.5e-5 i are
    above it (no early stop), while the raw index's 1e-5 + 2e-5 i would stop every step at once."""
    losses = [5e-6] + [1e-5 + 1.5e-5 * i for i in range(1, 100)]
    assert run_null_text(losses) == [1] + [3] * 99


# --- (d) DDIM's last step: alpha_bar_prev = 1 with set_alpha_to_one ------------------------------------------

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)


@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_last_ddim_step_follows_set_alpha_to_one(alpha_to_one):
    """Catches set_alpha_to_one ignored in the last DDIM step (t = 1 of 10 steps, whose t' = -99 < 0).

    By hand: alpha_bar_1 = (1 - beta_0)(1 - beta_1), beta = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, and
    alpha_bar_prev = 1 (z_0 = z0_hat) or alpha_bar_0 = 1 - beta_0 (z_0 = z0_hat + about 0.03 eps); also diffusers.
    """
    N = 10
    ours = DDIM(DDIMConfig(set_alpha_to_one=alpha_to_one))
    assert ours.timesteps(N)[-1] == 1
    b0, b1 = (math.sqrt(0.00085) + k * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999 for k in (0, 1))
    beta0, beta1 = b0 ** 2, b1 ** 2
    a_t = (1 - beta0) * (1 - beta1)
    a_prev = 1.0 if alpha_to_one else 1 - beta0
    g = torch.Generator().manual_seed(0)
    z_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    z0_hat = (z_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    by_hand = math.sqrt(a_prev) * z0_hat + math.sqrt(1 - a_prev) * eps
    other = 1 - beta0 if alpha_to_one else 1.0  # what the other setting would give: far from ours
    assert (by_hand - (math.sqrt(other) * z0_hat + math.sqrt(1 - other) * eps)).abs().max() > 0.05

    got = ours.step(eps, 1, z_t, N)
    assert torch.allclose(got, by_hand, atol=1e-5)
    ref = DDIMScheduler(**SD, set_alpha_to_one=alpha_to_one)
    ref.set_timesteps(N)
    assert ref.timesteps[-1].item() == 1
    assert torch.allclose(got, ref.step(eps, 1, z_t).prev_sample, atol=1e-5)
    # DDIM inversion's first step (z_0 -> z_1) reads the same final alpha_bar: the exact inverse of the above
    assert torch.allclose(ours.invert_step(eps, 1, by_hand, N), z_t, atol=1e-4)
    z_1 = math.sqrt(a_t) * (by_hand - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev) + math.sqrt(1 - a_t) * eps
    assert torch.allclose(ours.invert_step(eps, 1, by_hand, N), z_1, atol=1e-5)
