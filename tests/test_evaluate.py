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
              for lo, hi, m in ((0.1, 0.3, 1.0), (0.2, 0.5, 0.0))],
            {"kind": "blend", "method": "P2P", "attribute": "colour", "psnr_other": 41.5},
            {"kind": "blend", "method": "P2P + local blend", "attribute": "colour", "psnr_other": 42.0}]
    s = {(x["kind"], x.get("method")): x for x in aggregate(rows)}
    p2p = s["swap", "P2P"]
    assert (p2p["n"], p2p["success"], p2p["iou"], p2p["n_iou"], p2p["kept"]) == (2, 0.5, 0.9, 1, 0.75)
    assert s["fader", None]["ratio"] == pytest.approx(0.4 / 0.15) and s["fader", None]["monotone"] == 0.5
    met = {t["what"]: t["met"] for t in check_targets(list(s.values()))}
    assert met["colour swap, P2P: success"] is False and met["colour swap, P2P: mask IoU"] is True
    assert met["colour swap, baseline: mask IoU visibly lower (P2P's - 0.10)"] is False  # 0.85 > 0.9 - 0.1
    assert met["fader (pattern): strength at c=3 / at c=-1"] is True and met["fader (pattern): monotone in c"] is False
    assert met["plain generation: shape read right"] is None  # not measured
    assert met["local blend: untouched object's PSNR (dB)"] is True
    assert met["without blend: untouched object's PSNR lower (with blend's - 1 dB)"] is False  # 0.5 dB is no drift
    assert "| colour | P2P | 0.8 | 2 | 50% | 0.90 |" in tables(list(s.values()))


# --- per-case claims on the shipped model (big objects, fixed seeds) --------------------------------------------

def big(shape, colour, background, swaps, pattern="striped"):
    thing = scenes.Thing(shape, colour, "plain", "big", 0.5, 0.5, 0.22, 0.0)
    return Case(scenes.Scene((thing,), background, "plain", 0), 0, swaps, pattern, "red")


CASES = [big("square", "red", "green", {"colour": "blue"}), big("circle", "yellow", "purple", {"colour": "white"}),
         big("diamond", "blue", "orange", {"colour": "yellow"}, "dotted")]
SEEDS = (0, 1)
P2P_MIN_OK = 5  # colour swaps the judge reads as asked, of 6; measured 6 on the shipped model
IOU_GAIN = 0.4  # mean mask IoU of P2P over the baseline's; measured 0.83 against 0.27
REFINE_IOU = 0.85  # refinement keeps the object's mask; measured 0.95 to 0.97
ROUNDTRIP_PSNR = 30.0  # dB, every scene; measured 32.1 to 39.2 (6 scenes of seed 11)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("embedded", device="cpu")


@pytest.fixture(scope="module")
def colour_swaps(pipe):
    cases = [replace(c, seed=s) for c in CASES for s in SEEDS]
    return [(measure_swaps(pipe, c, "P2P", ("colour",))[0], measure_swaps(pipe, c, "baseline", ("colour",))[0])
            for c in cases]


def test_colour_swaps_keep_the_object_better_than_the_baseline(colour_swaps):
    """The paper's claim in miniature, through `p2p eval`'s measure: P2P's edit succeeds and keeps the source's
    mask; the baseline (the same as P2P with every injection off) keeps visibly less of it."""
    assert sum(p["success"] for p, _ in colour_swaps) >= P2P_MIN_OK, colour_swaps
    p2p, base = np.mean([p["iou"] for p, _ in colour_swaps]), np.mean([b["iou"] for _, b in colour_swaps])
    assert p2p >= base + IOU_GAIN, (p2p, base)


def test_the_baseline_is_p2p_with_no_injection(pipe, colour_swaps):
    """A broken P2P (cross_replace 0, self_replace 0) draws the baseline's images, so it scores the lower IoU."""
    case, (_, base) = replace(CASES[0], seed=SEEDS[0]), colour_swaps[0]
    s = EditSettings(case.prompt, (base["target"],), cross_replace=0.0, self_replace=0.0, seed=case.seed)
    broken = run_edit(pipe, s, progress=False).images
    for a, b in zip(broken, base["images"]):
        assert np.abs(np.asarray(a, float) - np.asarray(b, float)).max() <= 2


def test_refinement_keeps_the_object(pipe):
    rows = [measure_refine(pipe, replace(c, seed=SEEDS[0])) for c in CASES]
    assert min(r["iou"] for r in rows) >= REFINE_IOU, rows


def test_fader_moves_the_strength(pipe):
    """Pattern: c = 3 shows more stripe contrast than c = -1 (measured 0.64 against 0.30). Colour: c = -1
    washes the colour out against the source, c = 1 (measured saturation 0.16 against 0.82)."""
    striped = replace(CASES[0], scene=scenes.with_attribute(CASES[0].scene, 0, "pattern", "striped"))
    pattern = measure_fader(pipe, striped, "pattern")
    assert pattern["s@3"] > pattern["s@-1"] + 0.15, pattern
    colour = measure_fader(pipe, CASES[0], "colour")
    assert colour["s@-1"] < colour["s@1"] - 0.4, colour


def test_vae_round_trip(pipe):
    rows = [measure_roundtrip(pipe, s) for *_, s in scenes.sample(6, 11)]
    assert all(r["clean_read"] == 1 for r in rows)  # the judge reads the renderings themselves
    assert min(r["psnr"] for r in rows) >= ROUNDTRIP_PSNR, [r["psnr"] for r in rows]


def test_cli_eval_writes_rows_and_tables(tmp_path):
    out = tmp_path / "eval"
    assert cli(["eval", "--n", "1", "--parts", "plain,vae", "--out-dir", str(out), "--quiet"]) == 0
    d = json.loads((out / "eval.json").read_text())
    assert d["n"] == 1 and sorted(r["kind"] for r in d["rows"]) == ["plain", "vae"]
    assert next(r for r in d["rows"] if r["kind"] == "plain")["count"] in (0.0, 1.0)  # objects drawn == asked
    assert {t["what"] for t in d["targets"]} >= {"VAE round trip PSNR (dB)", "plain generation: shape read right"}
    md = (out / "eval.md").read_text()
    assert "Plain generation" in md and "objects counted right" in md and "VAE round trip" in md
    assert "Targets (issue 11" in md
    assert sorted(p.name for p in (out / "examples").iterdir()) == ["plain_000.png", "vae_000.png"]


def test_cli_eval_refuses_a_model_of_another_size(monkeypatch, capsys):
    from types import SimpleNamespace

    from p2p.cli import commands
    monkeypatch.setattr(commands, "load_pipeline", lambda args: SimpleNamespace(cfg=SimpleNamespace(image_size=512)))
    assert cli(["eval", "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "64 px" in err and "512 px" in err
