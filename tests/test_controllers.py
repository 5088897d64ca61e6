"""The controller contract as a researcher meets it: a subclass writes `wants` and `edit` only, in any
guidance layout; controllers compose; M can be had in float32; the README's example runs."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.attention import Site
from p2p import Compose, Controller, EditSettings, GuidanceLayout, Pipeline, SiteSelection, run_edit
from p2p.core.local_blend import LocalBlend
from p2p.files.loading import EMBEDDED_DIR

README = Path(__file__).resolve().parent.parent / "README.md"
CROSS = Site("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down", "cross", 0, 16, 1, 0)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(EMBEDDED_DIR, device="cpu", dtype="float32")


class MuteWord(Controller):
    """Written the obvious way: no thought of the guidance layout (notebook 01's example)."""

    def __init__(self, token):
        self.token = token

    def wants(self, site, hw):
        return site.is_cross

    def edit(self, M, site, hw):
        keep = torch.ones(M.shape[-1], dtype=M.dtype)
        keep[self.token] = 0
        return M * keep


def test_a_naive_controller_runs_in_low_memory_mode_and_matches_batched(pipe):
    kw = dict(seed=3, steps=4, progress=False)
    batched = pipe.generate("a big red square on a green background", controller=MuteWord(3), **kw)
    low = pipe.generate("a big red square on a green background", controller=MuteWord(3), low_memory=True, **kw)
    plain = pipe.generate("a big red square on a green background", **kw)
    diff = lambda a, b: np.abs(np.asarray(a[0], float) - np.asarray(b[0], float)).mean()  # noqa: E731
    assert diff(batched, low) <= 0.5  # the same edit, one or two UNet calls per step
    assert diff(batched, plain) > 1.0  # and it is an edit


def test_the_base_class_gives_edit_the_conditional_rows_only_and_copies():
    seen = []

    class Spy(MuteWord):
        def edit(self, M, site, hw):
            seen.append(M.clone())
            return super().edit(M, site, hw)

    ctl = Spy(2)
    M = torch.rand(4, 2, 16, 77)  # [uncond x 2 | cond x 2]
    before = M.clone()
    ctl.begin_step(0, 981, GuidanceLayout(2, slice(0, 2), None))
    assert not ctl.wants_map(CROSS, (4, 4))  # an unconditional call is never offered
    ctl.begin_step(0, 981, GuidanceLayout.batched(2))
    out = ctl.on_map(M, CROSS, (4, 4))
    assert torch.equal(seen[0], M[2:]) and torch.equal(M, before)
    assert torch.equal(out[:2], M[:2]) and (out[2:, ..., 2] == 0).all() and torch.equal(out[2:, ..., 3], M[2:, ..., 3])


def test_fp32_flag_hands_edit_float32_and_returns_the_run_dtype():
    class Precise(Controller):
        fp32 = True

        def wants(self, site, hw):
            return True

        def edit(self, M, site, hw):
            self.dtype = M.dtype
            return M * 2

    ctl = Precise()
    ctl.begin_step(0, 1, GuidanceLayout(1, None, slice(0, 1)))
    out = ctl.on_map(torch.rand(1, 2, 4, 77, dtype=torch.float16), CROSS, (2, 2))
    assert ctl.dtype == torch.float32 and out.dtype == torch.float16


class Scale(Controller):
    def __init__(self, token, c, shift=0.0):
        self.token, self.c, self.shift = token, c, shift

    def wants(self, site, hw):
        return True

    def edit(self, M, site, hw):
        M = M.clone()
        M[..., self.token] = M[..., self.token] * self.c
        return M

    def end_step(self, step, z_t):
        return z_t * 2 + self.shift


def test_compose_tells_every_controller_and_applies_them_in_order():
    a, b = Scale(1, 3.0, shift=1.0), Scale(1, 0.5, shift=-1.0)
    both = Compose(a, None, b)
    both.begin_sampling(7)
    both.begin_step(2, 500, GuidanceLayout.batched(1))
    assert (a.num_steps, b.num_steps, a.step, b.t) == (7, 7, 2, 500)
    M = torch.rand(2, 1, 4, 77)
    out = both.on_map(M, CROSS, (2, 2))
    assert torch.allclose(out[1, ..., 1], M[1, ..., 1] * 1.5) and torch.equal(out[0], M[0])
    z = torch.ones(1, 4, 2, 2)
    assert torch.equal(both.end_step(2, z), (z * 2 + 1) * 2 - 1)  # a, then b


def test_run_edit_composes_a_users_controller_after_the_edit(pipe):
    s = EditSettings("a big red square on a green background", ("a big blue square on a green background",),
                     seed=5, steps=4)
    alone = run_edit(pipe, s, progress=False)
    same = run_edit(pipe, s, controller=Controller(), progress=False)
    assert torch.equal(alone.z_0, same.z_0)
    muted = run_edit(pipe, s, controller=MuteWord(3), progress=False)
    assert not torch.allclose(alone.z_0, muted.z_0)


def test_during_uses_the_number_of_steps_the_pipeline_told():
    ctl = Controller()
    with pytest.raises(RuntimeError, match="not told the number of steps"):
        ctl.during(0.5)
    ctl.begin_sampling(10)
    ctl.begin_step(4, 0, GuidanceLayout.batched(1))
    assert ctl.during(0.5) and not ctl.during((0.5, 1.0))
    ctl.begin_step(5, 0, GuidanceLayout.batched(1))
    assert not ctl.during(0.5) and ctl.during((0.5, 1.0))


def test_local_blend_refuses_maps_too_small_to_make_a_mask(pipe):
    # the embedded model's 4x4 level at 32 px is a 2x2 grid: the 3x3 max-pool would cover everything
    s = EditSettings("a big red square on a green background", ("a big blue square on a green background",),
                     blend=("square",), blend_sites=SiteSelection(kinds=("cross",), res=(4,)), steps=2,
                     height=32, width=32)
    with pytest.raises(ValueError, match="local blend from 2x2 attention maps cannot work"):
        run_edit(pipe, s, progress=False)


def test_local_blend_refuses_maps_of_two_grids(pipe):
    s = EditSettings("a big red square on a green background", ("a big blue square on a green background",),
                     blend=("square",), blend_sites=SiteSelection(kinds=("cross",), res=(8, 16)), steps=2)
    with pytest.raises(ValueError, match=r"local blend averages maps of one grid; its sites hold 8x8, 16x16: "
                                         r"choose one resolution"):
        run_edit(pipe, s, progress=False)


def readme_example() -> str:
    text = README.read_text()
    m = re.search(r"<!-- controller example -->\n```python\n(.*?)```", text, re.S)
    assert m, "the README's Controllers section lost its example"
    return m.group(1)


def test_readme_controller_example_is_short_and_runs(pipe):
    code = readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) < 20
    ns = {}
    exec(compile(code, str(README), "exec"), ns)
    Sharpen = ns["Sharpen"]
    prompt = "a big red square on a green background"
    token = pipe.tokenizer.word_token_indices(prompt, "square")[0]
    # on a hand-made map: the token's spatial distribution gets sharper, its mass and the other tokens stay
    ctl = Sharpen(token, temperature=0.5)
    ctl.begin_sampling(10)
    ctl.begin_step(0, 981, GuidanceLayout.batched(1))
    site16 = next(s for s in pipe.unet.sites if s.is_cross and s.res == 16)
    site8 = next(s for s in pipe.unet.sites if s.is_cross and s.res == 8)
    assert ctl.wants_map(site16, (16, 16)) and not ctl.wants_map(site8, (8, 8))
    M = torch.rand(2, 4, 256, 77).softmax(-1).half()
    out = ctl.on_map(M, site16, (16, 16))
    assert out.dtype == torch.float16 and torch.equal(out[0], M[0])
    before, after = M[1, ..., token].float(), out[1, ..., token].float()
    assert torch.allclose(after.sum(-1), before.sum(-1), rtol=2e-3)
    assert (after.amax(-1) > before.amax(-1)).all()
    others = [j for j in range(77) if j != token]
    assert torch.equal(out[1][..., others], M[1][..., others])
    ctl.begin_step(5, 481, GuidanceLayout.batched(1))
    assert not ctl.wants_map(site16, (16, 16))  # the first half only
    # and in a real generation, in both guidance layouts
    for low in (False, True):
        pipe.generate(prompt, seed=1, steps=4, controller=Sharpen(token), low_memory=low, progress=False)
