"""`p2p eval`'s measures (p2p/world/evaluate.py, p2p/world/report.py).

First the measures themselves, on images drawn by the scene generator (whose masks and attributes are
known): each must move the right way when the thing it measures changes, and stay put when something else
does. Then per-case claims on the shipped model, a few fixed big-object cases and seeds, with thresholds
below what was measured on it (noted next to each), and the CLI.
"""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from p2p.cli import main as cli
from p2p.core.pipeline import Pipeline, to_images
from p2p.core.run import run_edit
from p2p.core.settings import EditSettings
from p2p.world import scenes
from p2p.world.evaluate import (FADER, Case, aggregate, compare, make_cases, make_pair_cases, measure_fader,
                                measure_refine, measure_roundtrip, measure_swaps, pattern_strength, psnr_in,
                                psnr_outside, read, saturation)
from p2p.world.report import check_targets, tables

BIG = scenes.Thing("square", "red", "striped", "big", 0.5, 0.5, 0.22, 5.0)
SCENE = scenes.Scene((BIG,), "green", "plain", 3)


def render(scene):
    image, masks = scenes.render(scene)
    return np.asarray(image), masks[0]


# --- the measures, on rendered scenes -------------------------------------------------------------------------

def test_pattern_strength_grows_with_the_pattern():
    striped, mask = render(SCENE)
    plain, _ = render(scenes.with_attribute(SCENE, 0, "pattern", "plain"))
    half = np.rint(0.5 * striped.astype(float) + 0.5 * plain).astype(np.uint8)  # stripes at half the contrast
    s = [pattern_strength(img, mask) for img in (plain, half, striped)]
    assert s[0] < 0.02 and s[0] < s[1] < s[2]
    assert s[2] == pytest.approx(1 - scenes.PATTERN_SHADE, abs=0.05)  # sharp stripes at PATTERN_SHADE
    assert math.isnan(pattern_strength(striped, np.zeros_like(mask)))


def test_saturation_falls_towards_grey():
    image, mask = render(scenes.with_attribute(SCENE, 0, "pattern", "plain"))
    grey = image.astype(float).mean(-1, keepdims=True)
    values = [saturation(np.rint(t * grey + (1 - t) * image).astype(np.uint8), mask) for t in (0.0, 0.5, 1.0)]
    r, g, b = scenes.COLOURS["red"]
    assert values[0] == pytest.approx((r - min(g, b)) / r, abs=0.02) and values[0] > values[1] > values[2]
    assert values[2] < 0.01


def test_psnr_outside_ignores_the_inside():
    image, mask = render(SCENE)
    changed = image.copy()
    changed[mask] = 255 - changed[mask]
    assert psnr_outside(image, changed, mask) == 99.0 and psnr_in(image, changed, mask) < 15
    shifted = np.clip(image.astype(int) + 10, 0, 255).astype(np.uint8)  # +10 where it does not clip
    keep = ~mask & (image.max(-1) <= 245)
    assert psnr_in(image, shifted, keep) == pytest.approx(20 * math.log10(255 / 10))
    assert math.isnan(psnr_in(image, changed, np.zeros_like(mask)))


def test_compare_on_renderings():
    """An exact swap keeps the mask (IoU 1) and everything else; a moved object does not keep the mask."""
    image, _ = render(SCENE)
    src = read(image)
    blue, _ = render(scenes.with_attribute(SCENE, 0, "colour", "blue"))
    row = compare(src, image, blue, "colour", "blue")
    assert row["success"] == 1 and row["kept"] == 1 and row["iou"] > 0.97 and row["shift"] < 0.3
    assert row["psnr_out"] > 40
    moved, _ = render(replace(SCENE, things=(replace(BIG, cx=0.4),)))
    row = compare(src, image, moved, "colour", "blue")
    assert row["success"] == 0 and row["iou"] < 0.7 and row["shift"] == pytest.approx(0.1 * 64, abs=0.5)


class IdentityVAE:
    """A VAE whose round trip is exact (latent = image), to check measure_roundtrip without a model."""
    def encode(self, x):
        return x

    def decode(self, z):
        return z


class NoisyPipe:
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, noise: float):
        self.vae, self.noise = IdentityVAE(), noise

    def decode(self, z):
        g = torch.Generator().manual_seed(0)
        return to_images(z + self.noise * torch.randn(z.shape, generator=g))


def test_roundtrip_of_an_exact_and_a_noisy_vae():
    scene = scenes.sample(3, seed=4)[2][2]
    exact = measure_roundtrip(NoisyPipe(0.0), scene)
    assert exact["psnr"] > 50 and exact["all_read"] == 1 and exact["clean_read"] == 1
    noisy = measure_roundtrip(NoisyPipe(0.1), scene)  # sigma 0.1 of [-1, 1]: 12.75 / 255
    assert noisy["psnr"] == pytest.approx(20 * math.log10(255 / 12.75), abs=0.5)


def test_cases_are_fixed_and_valid():
    cases = make_cases(30, seed=1)
    assert cases == make_cases(30, seed=1) and cases != make_cases(30, seed=2)
    for c in cases:
        t = c.scene.things[0]
        assert c.swaps["shape"] != t.shape and c.swaps["colour"] not in (t.colour, c.scene.background)
        assert c.swaps["background"] not in (t.colour, c.scene.background)
        assert c.patterned.things[0].pattern not in ("plain", c.swaps["pattern"])
        colour = c.colourful.things[0].colour  # the colour fader's: one with a hue, not the background's
        assert colour != "white" and colour != c.scene.background
        assert c.colourful == c.scene or t.colour == "white"
    for p in make_pair_cases(20, seed=1):
        a, b = p.scene.things
        assert a.shape != b.shape and p.colour not in (a.colour, b.colour, p.scene.background)


def test_aggregate_and_targets_by_hand():
    rows = [{"kind": "swap", "method": "P2P", "attribute": "colour", "cross_replace": 0.8, "success": 1.0, "iou": 0.9,
             "kept": 1.0},
            {"kind": "swap", "method": "P2P", "attribute": "colour", "cross_replace": 0.8, "success": 0.0, "kept": 0.5},
            {"kind": "swap", "method": "baseline", "attribute": "colour", "cross_replace": None, "success": 1.0,
             "iou": 0.85, "kept": 1.0},
            *[{"kind": "fader", "attribute": "pattern", f"s@{FADER[0]:g}": lo, f"s@{FADER[-1]:g}": hi, "monotone": m}
              for lo, hi, m in ((0.1, 0.3, 1.0), (0.2, 0.5, 0.0))]]
    s = {(x["kind"], x.get("method")): x for x in aggregate(rows)}
    p2p = s["swap", "P2P"]
    assert (p2p["n"], p2p["success"], p2p["iou"], p2p["n_iou"], p2p["kept"]) == (2, 0.5, 0.9, 1, 0.75)
    assert s["fader", None]["ratio"] == pytest.approx(0.4 / 0.15) and s["fader", None]["monotone"] == 0.5
    met = {t["what"]: t["met"] for t in check_targets(list(s.values()))}
    assert met["colour swap, P2P: success"] is False and met["colour swap, P2P: mask IoU"] is True
    assert met["colour swap, baseline: mask IoU visibly lower (P2P's - 0.10)"] is False  # 0.85 > 0.9 - 0.1
    assert met["fader (pattern): strength at c=3 / at c=-1"] is True and met["fader (pattern): monotone in c"] is False
    assert met["plain generation: shape read right"] is None  # not measured
    assert "| colour | P2P | 0.8 | 2 | 50% | 0.90 |" in tables(list(s.values()))
