"""A miniature of the paper's claims, measured on a scene model (`p2p eval`): cases and measures.

The paper shows (Sec. 4, Figs. 3-8) that injecting the source's cross-attention maps M into the generation of
an edited prompt P* changes what the prompt edit asks for while keeping the layout, where plain generation of
P* from the same seed keeps little. The images here come from a model of the procedural scene generator's world
(p2p/world/scenes.py), so the analytic reader of attributes and object masks (p2p/world/judge.py) scores every
image without a human. Each `measure_*(pipe, case) -> row` returns flat dicts of numbers (one per measured
case), `aggregate` averages them per row kind, and p2p/world/report.py turns that into tables and targets:

- plain generation (Sec. 4, text alignment): the prompt's attributes read back from its image;
- word swaps (Sec. 3.2, `Replace`) of shape, colour, pattern and background, P2P at the authors' defaults
  (cross-attention injected for 80% of the steps, self-attention 40%) and, for shape, at cross_replace 0.4
  (a structural swap wants a shorter injection, Sec. 3.2 and Fig. 7), against the baseline (the targets
  generated from the same z_T, no control): success, object mask IoU and centroid shift against the source,
  the other attributes kept, PSNR outside the object;
- refinement (`Refine`, Sec. 3.2): "a big red square" -> "a big red striped square" adds the pattern to the
  same object (success, mask IoU), against the baseline;
- the fader (`Reweight`, Sec. 3.2, Fig. 9): the pattern word's and the colour word's weight c in FADER against
  the attribute's strength in the source's object mask (pattern contrast, colour saturation);
- local blend (Sec. 3.2) on two-object scenes: one object's colour swapped with and without blending on its
  shape word; the PSNR of the other object (blend must leave it as it was);
- the VAE round trip D(E(x)) of rendered scenes (Sec. 3's latent model): PSNR and the judge's readout.

Every case is fixed by `seed`; the model folder's own sampling defaults (steps, guidance) are used.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from itertools import permutations
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from p2p.core.run import run_edit
from p2p.core.settings import EditSettings
from p2p.files.images import encode_image, psnr
from p2p.files.output import grid, save_image
from p2p.world import scenes
from p2p.world.judge import _dilate, _erode, centroid_shift, iou, judge, match

ATTRIBUTES = ("shape", "colour", "pattern", "size", "background")  # what the judge reads of a one-object scene
SWAPS = ("shape", "colour", "pattern", "background")  # attributes a one-word swap changes
SHAPE_CROSS = 0.4  # cross_replace of the extra shape-swap row (structural swaps, Sec. 3.2)
FADER = (-1.0, 0.0, 1.0, 2.0, 3.0)  # c of the reweighted word; 1 is the source itself
PSNR_CAP = 99.0  # dB, for pixels that are equal
MIN_SATURATION = 0.2  # palette colours below it (white) have no hue for the colour fader to strengthen


@dataclass(frozen=True)
class Case:
    """One single-object scene and what each row kind changes in it, all drawn from one seed."""
    scene: scenes.Scene
    seed: int  # of z_T
    swaps: dict  # attribute -> the value it is swapped to (pattern: from `patterned`)
    pattern: str  # a pattern (not plain) for the refinement and for `patterned`
    hue: str  # a colour with a hue (not grey-like white), for `colourful`

    @property
    def prompt(self) -> str:
        return scenes.caption(self.scene)

    @property
    def patterned(self) -> scenes.Scene:
        """The scene, its object given `pattern` if it is plain (a pattern swap and the pattern fader need
        a pattern word)."""
        plain = self.scene.things[0].pattern == "plain"
        return scenes.with_attribute(self.scene, 0, "pattern", self.pattern) if plain else self.scene

    @property
    def colourful(self) -> scenes.Scene:
        """The scene, its object given `hue` if its colour has no hue to fade (the colour fader)."""
        grey = _saturation(scenes.COLOURS[self.scene.things[0].colour]) < MIN_SATURATION
        return scenes.with_attribute(self.scene, 0, "colour", self.hue) if grey else self.scene

    def source(self, attribute: str) -> scenes.Scene:
        return self.patterned if attribute == "pattern" else self.scene


@dataclass(frozen=True)
class PairCase:
    """A two-object scene (shapes differ, so a shape word names one object) and a colour swap of thing `index`."""
    scene: scenes.Scene
    seed: int
    index: int
    colour: str

    @property
    def prompt(self) -> str:
        return scenes.caption(self.scene)

    @property
    def target(self) -> str:
        return scenes.caption(scenes.with_attribute(self.scene, self.index, "colour", self.colour))


def _pick(rng, values):
    return values[rng.integers(len(values))]


def _saturation(rgb) -> float:
    """HSV saturation (max - min) / max of one RGB colour."""
    rgb = np.asarray(rgb, np.float64)
    return float((rgb.max() - rgb.min()) / max(rgb.max(), 1.0))


def make_cases(n: int, seed: int = 0) -> list[Case]:
    """n single-object scenes from the generator, each with a new value for every swap."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = scenes.sample_scene(rng, max_things=1)
        t = scene.things[0]
        pattern = _pick(rng, [p for p in scenes.PATTERNS if p != "plain"])
        has = t.pattern if t.pattern != "plain" else pattern
        free = [c for c in scenes.COLOURS if c not in (t.colour, scene.background)]
        swaps = {"shape": _pick(rng, [s for s in scenes.SHAPES if s != t.shape]), "colour": _pick(rng, free),
                 "pattern": _pick(rng, [p for p in scenes.PATTERNS if p not in ("plain", has)]),
                 "background": _pick(rng, free)}
        hue = _pick(rng, [c for c, v in scenes.COLOURS.items() if c != scene.background and _saturation(v) >= MIN_SATURATION])
        out.append(Case(scene, int(rng.integers(2**31)), swaps, pattern, hue))
    return out


def make_pair_cases(n: int, seed: int = 0) -> list[PairCase]:
    """n two-object scenes from the generator (redrawn until their shapes differ), a colour swap of one thing
    to a colour neither the background nor the other thing has."""
    rng = np.random.default_rng(seed + 1)
    out = []
    while len(out) < n:
        scene = scenes.sample_scene(rng, max_things=2, p_two=1.0)
        if scene.things[0].shape == scene.things[1].shape:
            continue
        k = int(rng.integers(2))
        taken = {scene.background, *(t.colour for t in scene.things)}
        out.append(PairCase(scene, int(rng.integers(2**31)), k, _pick(rng, [c for c in scenes.COLOURS if c not in taken])))
    return out


# --- readings and image measures -----------------------------------------------------------------------------

def read(image) -> dict:
    """The judge's reading of a one-object image as a dict; attributes None where it finds no object."""
    r = judge(image, n_things=1)
    if not r.things:
        return {"background": r.background, "shape": None, "colour": None, "pattern": None, "size": None,
                "mask": np.zeros(np.asarray(image).shape[:2], bool)}
    t = r.things[0]
    return {"background": r.background, "shape": t.shape, "colour": t.colour, "pattern": t.pattern,
            "size": t.size, "mask": t.mask}


def truth(scene: scenes.Scene, index: int = 0) -> dict:
    t = scene.things[index]
    return {"shape": t.shape, "colour": t.colour, "pattern": t.pattern, "size": t.size, "background": scene.background}


def psnr_in(a, b, mask: np.ndarray) -> float:
    """PSNR (dB) of two images over the pixels where `mask` is True (PSNR_CAP where equal, nan if none)."""
    if not mask.any():
        return float("nan")
    return min(psnr(np.asarray(a)[mask], np.asarray(b)[mask]), PSNR_CAP)


def psnr_outside(a, b, mask: np.ndarray) -> float:
    """PSNR (dB) of two images over the pixels where `mask` is False."""
    return psnr_in(a, b, ~mask)


def _luminance(image, mask: np.ndarray) -> np.ndarray:
    return np.asarray(image, np.float32)[mask] @ np.array([0.299, 0.587, 0.114], np.float32)


def pattern_strength(image, mask: np.ndarray) -> float:
    """Contrast of the pattern inside an object's mask (eroded by a pixel, away from its blurred edge):
    (L90 - L10) / L90 of the luminance percentiles; 0 for a flat object, 1 - PATTERN_SHADE for scenes'
    stripes and dots drawn sharp. nan for a mask too small to tell."""
    inner = _erode(mask, 1)
    if inner.sum() < 10:
        return float("nan")
    lo, hi = np.percentile(_luminance(image, inner), [10, 90])
    return float(max(hi - lo, 0.0) / max(hi, 1.0))


def saturation(image, mask: np.ndarray) -> float:
    """HSV saturation (max - min) / max of the mean colour inside the mask (eroded by a pixel)."""
    inner = _erode(mask, 1)
    if inner.sum() < 10:
        return float("nan")
    return _saturation(np.asarray(image, np.float32)[inner].mean(0))


def compare(src: dict, src_img, edit_img, attribute: str, value: str) -> dict:
    """Success, other attributes kept, mask IoU, centroid shift and PSNR outside both objects (object
    edits) of an edit of a one-object source whose `attribute` was asked to become `value`."""
    e = read(edit_img)
    row = {"success": float(e[attribute] == value),
           "kept": float(np.mean([e[a] == src[a] for a in ATTRIBUTES if a != attribute]))}
    if src["mask"].any():  # a source without an object has no layout to keep
        row["iou"] = iou(src["mask"], e["mask"])
        if e["mask"].any():
            row["shift"] = centroid_shift(src["mask"], e["mask"])
        if attribute != "background":
            row["psnr_out"] = psnr_outside(src_img, edit_img, _dilate(src["mask"] | e["mask"], 2))
    return row


# --- the measures: one call, one case, flat rows -------------------------------------------------------------

def measure_plain(pipe, case: Case, steps: int | None = None) -> dict:
    """Plain generation of the case's prompt: 1 per attribute the judge reads as the prompt says; `all`."""
    (image,) = pipe.generate(case.prompt, seed=case.seed, steps=steps, progress=False)
    got, want = read(image), truth(case.scene)
    row = {a: float(got[a] == want[a]) for a in ATTRIBUTES}
    return {"kind": "plain", "prompt": case.prompt, "seed": case.seed, **row, "all": float(all(row.values())),
            "images": [image]}


def measure_swaps(pipe, case: Case, method: str = "P2P", attributes=SWAPS, cross_replace: float = 0.8,
                  steps: int | None = None) -> list[dict]:
    """Word swaps of the case (one row per attribute), with Prompt-to-Prompt (`Replace`, this cross_replace,
    the default self_replace) or the baseline (the prompts generated from the same seed, no control). The
    swaps that share a source prompt run in one batch."""
    rows = []
    groups = {}
    for a in attributes:
        groups.setdefault(case.source(a), []).append(a)
    for scene, attrs in groups.items():
        prompt = scenes.caption(scene)
        targets = tuple(scenes.caption(scenes.with_attribute(scene, 0, a, case.swaps[a])) for a in attrs)
        if method == "baseline":
            images = pipe.generate([prompt, *targets], seed=case.seed, steps=steps, progress=False)
        else:
            s = EditSettings(prompt, targets, cross_replace=cross_replace, seed=case.seed, steps=steps)
            images = run_edit(pipe, s, progress=False).images
        src = read(images[0])
        for a, target, img in zip(attrs, targets, images[1:]):
            rows.append({"kind": "swap", "method": method, "attribute": a,
                         "cross_replace": cross_replace if method != "baseline" else None, "prompt": prompt,
                         "target": target, "seed": case.seed, **compare(src, images[0], img, a, case.swaps[a]),
                         "images": [images[0], img]})
    return rows


def measure_refine(pipe, case: Case, method: str = "P2P", steps: int | None = None) -> dict:
    """Refinement (`Refine`): the plain object of the scene gets the pattern word `case.pattern` added."""
    source = scenes.with_attribute(case.scene, 0, "pattern", "plain")
    prompt, target = scenes.caption(source), scenes.caption(scenes.with_attribute(source, 0, "pattern", case.pattern))
    if method == "baseline":
        images = pipe.generate([prompt, target], seed=case.seed, steps=steps, progress=False)
    else:
        images = run_edit(pipe, EditSettings(prompt, (target,), mode="refine", seed=case.seed, steps=steps),
                          progress=False).images
    row = compare(read(images[0]), images[0], images[1], "pattern", case.pattern)
    return {"kind": "refine", "method": method, "attribute": "pattern", "prompt": prompt, "target": target,
            "seed": case.seed, **row, "images": images}


def measure_fader(pipe, case: Case, attribute: str = "pattern", steps: int | None = None) -> dict:
    """The fader (`Reweight`) of the object's pattern or colour word at each c of FADER: the strength
    (pattern_strength or saturation) in the source's object mask, `monotone` (1 if non-decreasing in c) and
    the strengths `s@c`, on `case.patterned` or `case.colourful`."""
    scene = case.patterned if attribute == "pattern" else case.colourful
    word = scene.things[0].pattern if attribute == "pattern" else scene.things[0].colour
    prompt = scenes.caption(scene)
    s = EditSettings(prompt, (prompt,) * len(FADER), mode="reweight", reweight={word: list(FADER)},
                     seed=case.seed, steps=steps)
    images = run_edit(pipe, s, progress=False).images
    mask = read(images[0])["mask"]
    strength = pattern_strength if attribute == "pattern" else saturation
    values = [strength(img, mask) for img in images[1:]]
    ok = not np.isnan(values).any()
    row = {f"s@{c:g}": v for c, v in zip(FADER, values)}
    return {"kind": "fader", "attribute": attribute, "word": word, "prompt": prompt, "seed": case.seed, **row,
            **({"monotone": float(np.all(np.diff(values) >= 0))} if ok else {}), "images": images}


def _assign(readings, scene: scenes.Scene) -> list[int]:
    """For each thing of the scene, the index of the reading that best agrees on shape and colour."""
    def score(r, t):
        return (r.shape == t.shape) + (r.colour == t.colour)
    return list(max(permutations(range(len(readings)), len(scene.things)),
                    key=lambda p: sum(score(readings[i], t) for i, t in zip(p, scene.things))))


def measure_blend(pipe, case: PairCase, blend: bool, steps: int | None = None) -> dict:
    """A colour swap of one object of a two-object scene, with local blend on its shape word or without: the
    untouched object's PSNR (`psnr_other`, over its source mask grown by a pixel), the edit's success, and
    the PSNR outside both objects."""
    shape = case.scene.things[case.index].shape
    s = EditSettings(case.prompt, (case.target,), blend=((shape,), (shape,)) if blend else (), seed=case.seed,
                     steps=steps)
    src_img, edit_img = run_edit(pipe, s, progress=False).images
    src, edit = judge(src_img, n_things=2), judge(edit_img, n_things=2)
    row = {"kind": "blend", "method": "P2P + local blend" if blend else "P2P", "attribute": "colour",
           "prompt": case.prompt, "target": case.target, "seed": case.seed,
           "success": float(any(r.colour == case.colour and r.shape == shape for r in edit.things)),
           "two_objects": float(len(src.things) == 2), "images": [src_img, edit_img]}
    if len(src.things) == 2:
        other = src.things[_assign(src.things, case.scene)[1 - case.index]].mask
        row["psnr_other"] = psnr_in(src_img, edit_img, _dilate(other, 1))
        row["psnr_out"] = psnr_outside(src_img, edit_img, _dilate(src.things[0].mask | src.things[1].mask, 2))
    return row


def measure_roundtrip(pipe, scene: scenes.Scene) -> dict:
    """The VAE round trip D(E(x)) of the rendered scene: PSNR, and whether the judge reads every attribute
    of every thing (and the background) right on it (`all_read`) and on the rendering itself (`clean_read`)."""
    image, masks = scenes.render(scene)
    (back,) = pipe.decode(encode_image(pipe, image))

    def all_right(img) -> float:
        r = judge(img, n_things=len(scene.things))
        if r.background != scene.background or len(r.things) != len(scene.things):
            return 0.0
        pairs = match(masks, [t.mask for t in r.things])
        return float(all(getattr(r.things[j], a) == getattr(scene.things[i], a)
                         for i, j in pairs for a in scenes.ATTRIBUTES))
    return {"kind": "vae", "prompt": scenes.caption(scene), "psnr": min(psnr(image, back), PSNR_CAP),
            "all_read": all_right(back), "clean_read": all_right(image), "images": [image, back]}


# --- the evaluation: every measure on every case, then averages per row kind ---------------------------------

PARTS = ("plain", "swaps", "refine", "fader", "blend", "vae")
GROUP = ("kind", "method", "attribute", "cross_replace")  # what a row of the tables is
TEXT = {"kind", "method", "attribute", "cross_replace", "prompt", "target", "word", "seed", "case", "images"}


def plan(pipe, n: int, seed: int = 0, parts=PARTS, steps: int | None = None) -> list[tuple[int, partial]]:
    """(case index, measure) pairs: every measure of `parts` on n cases of each kind, case by case."""
    jobs = []
    for k, case in enumerate(make_cases(n, seed)):
        on = lambda f, *a: jobs.append((k, partial(f, pipe, case, *a, steps=steps)))  # noqa: E731 (bound now)
        if "plain" in parts:
            on(measure_plain)
        if "swaps" in parts:
            on(measure_swaps, "P2P")
            on(measure_swaps, "baseline")
            on(measure_swaps, "P2P", ("shape",), SHAPE_CROSS)
        if "refine" in parts:
            on(measure_refine, "P2P")
            on(measure_refine, "baseline")
        if "fader" in parts:
            on(measure_fader, "pattern")
            on(measure_fader, "colour")
    if "blend" in parts:
        jobs += [(k, partial(measure_blend, pipe, case, b, steps=steps))
                 for k, case in enumerate(make_pair_cases(n, seed)) for b in (False, True)]
    if "vae" in parts:
        jobs += [(k, partial(measure_roundtrip, pipe, s)) for k, (*_, s) in enumerate(scenes.sample(n, seed + 2))]
    return jobs


def evaluate(pipe, n: int = 48, seed: int = 0, parts=PARTS, steps: int | None = None, progress: bool = True,
             examples: Path | None = None) -> list[dict]:
    """Run every measure of `parts` on n cases per row kind; the rows, each with the index of its case.
    `examples`: also write each row's images (source, edit, ...) there as one sheet per row."""
    rows = []
    for k, job in tqdm(plan(pipe, n, seed, parts, steps), desc="eval", disable=not progress):
        out = job()
        for row in out if isinstance(out, list) else [out]:
            row = {"case": k, **row}
            images = row.pop("images", [])
            if examples is not None and images:
                name = "_".join(str(row[g]) for g in GROUP if row.get(g) is not None).replace(" ", "")
                save_image(grid(images), examples / f"{name}_{k:03d}.png", {"command": "eval", **_plain(row)})
            rows.append(row)
    return rows


def _plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "images"}


def aggregate(rows: list[dict]) -> list[dict]:
    """One summary per row kind (kind, method, attribute, cross_replace): n, each measure's mean over the
    rows that have it (n_<measure> where fewer), and for the fader `ratio` = mean s@3 / mean s@-1."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r.get(g) for g in GROUP), []).append(r)
    out = []
    for key, rs in groups.items():
        s = {**dict(zip(GROUP, key)), "n": len(rs)}
        for m in [m for m in rs[0] | {k: 0 for r in rs for k in r} if m not in TEXT]:
            values = [float(r[m]) for r in rs if m in r and r[m] is not None and not np.isnan(r[m])]
            s[m] = float(np.mean(values)) if values else float("nan")
            if len(values) < len(rs):
                s[f"n_{m}"] = len(values)
        if key[0] == "fader":
            lo, hi = s[f"s@{FADER[0]:g}"], s[f"s@{FADER[-1]:g}"]
            s["ratio"] = hi / lo if lo > 0 else float("inf")
        out.append(s)
    return out

