"""The procedural scene generator: determinism, caption grammar, masks against pixels, attribute edits."""
import re
import time
from dataclasses import asdict

import numpy as np
import pytest

from p2p.world import scenes

PHRASE = re.compile(r"a (?P<size>\w+) (?P<colour>\w+)(?: (?P<pattern>\w+))? (?P<shape>\w+)")
CAPTION = re.compile(r"(?P<things>.+) on a (?P<background>\w+) background")


def parse(text: str) -> tuple[list[dict], str]:
    """Caption -> ([{size, colour, pattern, shape}, ...], background), written independently of scenes.caption."""
    m = CAPTION.fullmatch(text)
    assert m, text
    things = []
    for phrase in m["things"].split(" and "):
        p = PHRASE.fullmatch(phrase)
        assert p, phrase
        things.append({**p.groupdict(), "pattern": p["pattern"] or "plain"})
    return things, m["background"]


@pytest.fixture(scope="module")
def batch():
    return scenes.sample(300, seed=123)


def test_deterministic():
    a, b = scenes.sample(20, seed=7), scenes.sample(20, seed=7)
    for (ia, ca, sa), (ib, cb, sb) in zip(a, b):
        assert ia.tobytes() == ib.tobytes() and ca == cb and sa == sb
    c = scenes.sample(20, seed=8)
    assert [x[1] for x in a] != [x[1] for x in c]
    scene = a[0][2]
    assert scenes.render(scene)[0].tobytes() == scenes.render(scene)[0].tobytes()


def test_caption_grammar(batch):
    seen = set()
    for image, text, scene in batch:
        assert image.size == (64, 64) and image.mode == "RGB"
        things, background = parse(text)
        assert background == scene.background
        assert len(things) == len(scene.things)
        for got, t in zip(things, scene.things):
            assert got == {"size": t.size, "colour": t.colour, "pattern": t.pattern, "shape": t.shape}
            assert t.colour != scene.background
            assert "plain" not in text.split()
        seen.update(text.split())
    assert seen == set(scenes.vocabulary())  # every word appears, and no other
    assert all(w.isalpha() and w.islower() for w in scenes.vocabulary())
    assert len(scenes.COLOURS) >= 7 and len(set(scenes.COLOURS.values())) == len(scenes.COLOURS)


def test_attribute_frequencies(batch):
    counts = {}
    for _, _, scene in batch:
        counts[len(scene.things)] = counts.get(len(scene.things), 0) + 1
        for t in scene.things:
            for k in scenes.ATTRIBUTES:
                counts[getattr(t, k)] = counts.get(getattr(t, k), 0) + 1
            lo, hi = scenes.RADIUS[t.size]
            assert lo <= t.r <= hi
            m = scenes.EXTENT * t.r
            assert m <= t.cx <= 1 - m and m <= t.cy <= 1 - m
    assert 0.2 < counts[2] / len(batch) < 0.4  # p_two = 0.3
    for v in (*scenes.SHAPES, *scenes.PATTERNS, *scenes.SIZES):
        assert counts[v] > 30, v


def test_masks_match_pixels(batch):
    """Inside a visible mask the pixels are the object colour or its pattern shade; outside all masks,
    away from edges, they are the background."""
    for image, _, scene in batch[:150]:
        img = np.asarray(image, np.float32)
        _, masks = scenes.render(scene)
        bg = scenes.background_array(scene)
        assert masks.shape == (len(scene.things), 64, 64) and masks.dtype == bool
        union = masks.any(0)
        grown = union.copy()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                grown |= np.roll(union, (dy, dx), axis=(0, 1))
        assert np.abs(img[~grown] - bg[~grown]).max() <= 1.0
        for t, m in zip(scene.things, masks):
            assert m.sum() > 0.8 * np.pi * (0.5 * t.r * 64) ** 2  # even a star covers this much
            core = m.copy()  # the mask's interior: no antialiased edge pixels
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    core &= np.roll(m, (dy, dx), axis=(0, 1))
            px = img[core]
            col, dark = np.asarray(scenes.COLOURS[t.colour]), scenes.pattern_colour(t.colour)
            # each pixel lies on the segment between the colour and its shade (mixed pattern coverage)
            d = dark - col
            s = np.clip(((px - col) @ d) / (d @ d), 0, 1)
            assert np.abs(px - (col + s[:, None] * d)).max() <= 2.0
            if t.pattern == "plain":
                assert np.abs(px - col).max() <= 1.0
            else:  # the pattern is visible: some pixels are (nearly) the full shade
                assert (s > 0.7).sum() >= 3, (t, scenes.caption(scene))


def test_no_overlap():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = scenes.sample_scene(rng, max_things=2, p_two=1.0)
        assert len(scene.things) == 2
        alone = [scenes.render(scenes.Scene((t,), scene.background, scene.bg_kind, scene.bg_seed))[1][0]
                 for t in scene.things]
        inter = (alone[0] & alone[1]).sum()
        assert inter <= 0.05 * min(a.sum() for a in alone)
        _, masks = scenes.render(scene)
        assert not (masks[0] & masks[1]).any()


def test_with_attribute_changes_one_thing():
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = scenes.sample_scene(rng, p_two=0.5)
        i = int(rng.integers(len(scene.things)))
        for attribute, values in (("shape", scenes.SHAPES), ("colour", scenes.COLOURS), ("pattern", scenes.PATTERNS),
                                  ("size", scenes.SIZES)):
            for value in values:
                if attribute == "colour" and value == scene.background:
                    with pytest.raises(ValueError):
                        scenes.with_attribute(scene, i, attribute, value)
                    continue
                new = scenes.with_attribute(scene, i, attribute, value)
                assert (new.background, new.bg_kind, new.bg_seed) == (scene.background, scene.bg_kind, scene.bg_seed)
                for j, (a, b) in enumerate(zip(scene.things, new.things)):
                    if j != i:
                        assert a == b
                        continue
                    diff = {k for k, v in asdict(a).items() if asdict(b)[k] != v}
                    assert getattr(b, attribute) == value
                    allowed = {attribute, "r", "cx", "cy"} if attribute == "size" else {attribute}
                    assert diff <= allowed
                    lo, hi = scenes.RADIUS[b.size]
                    assert lo - 1e-9 <= b.r <= hi + 1e-9
                things, _ = parse(scenes.caption(new))
                assert things[i][attribute] == value
        free = [c for c in scenes.COLOURS if all(t.colour != c for t in scene.things)]
        new = scenes.with_attribute(scene, 0, "background", free[0])
        assert new.things == scene.things and new.background == free[0] and new.bg_seed == scene.bg_seed
        with pytest.raises(ValueError):
            scenes.with_attribute(scene, 0, "background", scene.things[0].colour)
    with pytest.raises(ValueError):
        scenes.with_attribute(scene, 0, "shape", "hexagon")


def test_edit_keeps_other_pixels():
    """Recolouring a thing changes only pixels of that thing."""
    scene = next(s for _, _, s in scenes.sample(50, seed=3) if len(s.things) == 2)
    colour = next(c for c in scenes.COLOURS if c not in (scene.background, scene.things[0].colour))
    a, masks = scenes.render(scene)
    b, _ = scenes.render(scenes.with_attribute(scene, 0, "colour", colour))
    changed = np.abs(np.asarray(a, int) - np.asarray(b, int)).sum(-1) > 0
    grown = masks[0].copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grown |= np.roll(masks[0], (dy, dx), axis=(0, 1))
    assert changed.any() and not (changed & ~grown).any()


def test_render_speed():
    """Not a timed assertion (machines differ), only a guard against something absurd; prints the rate."""
    rng = np.random.default_rng(0)
    batch = [scenes.sample_scene(rng) for _ in range(200)]
    t = time.perf_counter()
    for s in batch:
        scenes.render(s)
    rate = len(batch) / (time.perf_counter() - t)
    print(f"render: {rate:.0f} images/s")
    assert rate > 20
