"""A miniature of the paper's claims, measured on a scene model (`p2p eval`): cases and measures.

The paper shows (Sec. 4, Figs. 3-8) that injecting the source's cross-attention maps M into the generation of
an edited prompt P* changes what the prompt edit asks for while keeping the layout, where plain generation of
P* from the same seed keeps little. The images here come from a model of the procedural scene generator's world
(p2p/world/scenes.py), so the analytic reader of attributes and object masks (p2p/world/judge.py) scores every
image without a human. Each `measure_*(pipe, case) -> row` returns flat dicts of numbers (one per measured
case), `aggregate` averages them per row kind, and p2p/world/report.py turns that into tables and targets:

- plain generation (Sec. 4, text alignment): the prompt's attributes read back from its image, and the number
  of objects it shows;
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

import json
import re
from dataclasses import dataclass, fields
from itertools import permutations
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from p2p.core.run import run_edit
from p2p.core.settings import EditSettings
from p2p.files.images import encode_image, psnr
from p2p.files.output import grid, save_image
from p2p.world import scenes
from p2p.world.judge import _dilate, _erode, centroid_shift, count, iou, judge, match

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


# --- what each measure runs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalJob:
    """One sampling run of a measure: an edit (`run_edit`), a generation ("generate": the prompts from one seed's
    z_T with no control, the baseline and plain generation) or the VAE round trip of a rendered `scene` ("vae").
    `part` (one of PARTS) names the measure that scores it, `label` says what it is in an experiment's tables
    (its first word is the index of its case)."""
    part: str
    kind: str
    settings: EditSettings
    label: str
    scene: scenes.Scene | None = None


def jobs_plain(case: Case, steps: int | None = None, k: int = 0) -> list[EvalJob]:
    return [EvalJob("plain", "generate", EditSettings(case.prompt, seed=case.seed, steps=steps), f"{k} plain")]


def jobs_swaps(case: Case, method: str = "P2P", attributes=SWAPS, cross_replace: float = 0.8,
               steps: int | None = None, k: int = 0) -> list[EvalJob]:
    """One job per source prompt (the pattern swap's may be `case.patterned`), its swaps the targets."""
    groups = {}
    for a in attributes:
        groups.setdefault(case.source(a), []).append(a)
    out = []
    for scene, attrs in groups.items():
        targets = tuple(scenes.caption(scenes.with_attribute(scene, 0, a, case.swaps[a])) for a in attrs)
        if method == "baseline":
            job = EvalJob("swaps", "generate", EditSettings(scenes.caption(scene), targets, seed=case.seed, steps=steps),
                          f"{k} swaps baseline {'+'.join(attrs)}")
        else:
            s = EditSettings(scenes.caption(scene), targets, cross_replace=cross_replace, seed=case.seed, steps=steps)
            job = EvalJob("swaps", "edit", s, f"{k} swaps P2P {'+'.join(attrs)} cross_replace={cross_replace:g}")
        out.append(job)
    return out


def jobs_refine(case: Case, method: str = "P2P", steps: int | None = None, k: int = 0) -> list[EvalJob]:
    """The plain object of the scene gets the pattern word `case.pattern` added."""
    source = scenes.with_attribute(case.scene, 0, "pattern", "plain")
    prompt, target = scenes.caption(source), scenes.caption(scenes.with_attribute(source, 0, "pattern", case.pattern))
    s = EditSettings(prompt, (target,), mode="refine", seed=case.seed, steps=steps)
    return [EvalJob("refine", "generate" if method == "baseline" else "edit", s, f"{k} refine {method}")]


def jobs_fader(case: Case, attribute: str = "pattern", steps: int | None = None, k: int = 0) -> list[EvalJob]:
    """The object's pattern word (on `case.patterned`) or colour word (on `case.colourful`) at each c of FADER."""
    scene = case.patterned if attribute == "pattern" else case.colourful
    word = scene.things[0].pattern if attribute == "pattern" else scene.things[0].colour
    prompt = scenes.caption(scene)
    s = EditSettings(prompt, (prompt,) * len(FADER), mode="reweight", reweight={word: list(FADER)}, seed=case.seed,
                     steps=steps)
    return [EvalJob("fader", "edit", s, f"{k} fader {attribute}")]


def jobs_blend(case: PairCase, blend: bool, steps: int | None = None, k: int = 0) -> list[EvalJob]:
    """A colour swap of one object of a two-object scene, with local blend on its shape word or without."""
    shape = case.scene.things[case.index].shape
    s = EditSettings(case.prompt, (case.target,), blend=((shape,), (shape,)) if blend else (), seed=case.seed,
                     steps=steps)
    return [EvalJob("blend", "edit", s, f"{k} blend {'local' if blend else 'none'}")]


def jobs_roundtrip(scene: scenes.Scene, k: int = 0) -> list[EvalJob]:
    return [EvalJob("vae", "vae", EditSettings(scenes.caption(scene)), f"{k} vae", scene)]


def run_job(pipe, job: EvalJob) -> list:
    """The images of one job: [source, edit 1, ...], the generated prompts, or [rendering, round trip]."""
    s = job.settings
    if job.kind == "vae":
        image, _ = scenes.render(job.scene)
        (back,) = pipe.decode(encode_image(pipe, image))
        return [image, back]
    if job.kind == "generate":
        return pipe.generate(s.prompts, seed=s.seed, steps=s.steps, progress=False)
    return run_edit(pipe, s, progress=False).images


def part_of(kind: str, s: EditSettings) -> str:
    """The measure (a PARTS entry) that scores a job of this kind and these settings."""
    if kind == "vae":
        return "vae"
    if s.mode in ("reweight", "refine"):
        return {"reweight": "fader", "refine": "refine"}[s.mode]
    if not s.targets:
        return "plain"
    return "blend" if " and " in s.prompt else "swaps"


# --- the scores: a job's images -> flat rows -----------------------------------------------------------------

def parse_caption(prompt: str) -> tuple[list[dict], str]:
    """`scenes.caption` read back: each thing's shape, colour, pattern and size, and the background colour."""
    phrases, _, background = prompt.rpartition(" on a ")
    things = []
    for phrase in phrases.split(" and "):
        w = phrase.split()  # a SIZE COLOUR [PATTERN] SHAPE
        things.append({"shape": w[-1], "colour": w[2], "pattern": w[3] if len(w) == 5 else "plain", "size": w[1]})
    return things, background.removesuffix(" background")


def caption_truth(prompt: str, index: int = 0) -> dict:
    """`truth` of the scene a caption describes."""
    things, background = parse_caption(prompt)
    return {**things[index], "background": background}


def changed(prompt: str, target: str) -> tuple[str, str]:
    """The attribute of thing 0 (or the background) a one-word edit of the caption changes, and its new value."""
    a, b = caption_truth(prompt), caption_truth(target)
    attribute = next(k for k in ATTRIBUTES if a[k] != b[k])
    return attribute, b[attribute]


def score_plain(kind, s: EditSettings, scene, images) -> list[dict]:
    """Plain generation of the case's prompt: 1 per attribute the judge reads as the prompt says; `all`; `count`:
    1 where the image shows as many separate objects as the prompt names (`judge.count`; the attributes are read
    off the largest, so a second copy of the object goes unseen by them, but an edit recolours it too)."""
    (image,) = images
    got, want = read(image), caption_truth(s.prompt)
    row = {a: float(got[a] == want[a]) for a in ATTRIBUTES}
    return [{"kind": "plain", "prompt": s.prompt, "seed": s.seed, **row, "all": float(all(row.values())),
             "count": float(count(image) == len(parse_caption(s.prompt)[0])), "images": [image]}]


def score_swaps(kind, s: EditSettings, scene, images) -> list[dict]:
    """Word swaps, one row per target: P2P (an edit) or the baseline (a generation), `compare`d to the source."""
    method = "baseline" if kind == "generate" else "P2P"
    src = read(images[0])
    rows = []
    for target, img in zip(s.targets, images[1:]):
        a, value = changed(s.prompt, target)
        rows.append({"kind": "swap", "method": method, "attribute": a,
                     "cross_replace": s.cross_replace if method != "baseline" else None, "prompt": s.prompt,
                     "target": target, "seed": s.seed, **compare(src, images[0], img, a, value),
                     "images": [images[0], img]})
    return rows


def score_refine(kind, s: EditSettings, scene, images) -> list[dict]:
    """Refinement: the added pattern read in the edit, the object kept."""
    target = s.targets[0]
    row = compare(read(images[0]), images[0], images[1], "pattern", changed(s.prompt, target)[1])
    return [{"kind": "refine", "method": "baseline" if kind == "generate" else "P2P", "attribute": "pattern",
             "prompt": s.prompt, "target": target, "seed": s.seed, **row, "images": images}]


def score_fader(kind, s: EditSettings, scene, images) -> list[dict]:
    """The fader of a pattern or colour word at each c: the strength (pattern_strength or saturation) in the
    source's object mask, `monotone` (1 if non-decreasing in c) and the strengths `s@c`."""
    ((word, cs),) = s.reweight.items()
    attribute = "pattern" if word in scenes.PATTERNS else "colour"
    mask = read(images[0])["mask"]
    strength = pattern_strength if attribute == "pattern" else saturation
    values = [strength(img, mask) for img in images[1:]]
    ok = not np.isnan(values).any()
    row = {f"s@{c:g}": v for c, v in zip(cs, values)}
    return [{"kind": "fader", "attribute": attribute, "word": word, "prompt": s.prompt, "seed": s.seed, **row,
             **({"monotone": float(np.all(np.diff(values) >= 0))} if ok else {}), "images": images}]


def _assign(readings, things: list[dict]) -> list[int]:
    """For each thing of the caption, the index of the reading that best agrees on shape and colour."""
    def score(r, t):
        return (r.shape == t["shape"]) + (r.colour == t["colour"])
    return list(max(permutations(range(len(readings)), len(things)),
                    key=lambda p: sum(score(readings[i], t) for i, t in zip(p, things))))


def score_blend(kind, s: EditSettings, scene, images) -> list[dict]:
    """A colour swap of one object of two: the untouched object's PSNR (`psnr_other`, over its source mask grown
    by a pixel), the edit's success, and the PSNR outside both objects."""
    things, edited = parse_caption(s.prompt)[0], parse_caption(s.targets[0])[0]
    index = next(i for i, (a, b) in enumerate(zip(things, edited)) if a["colour"] != b["colour"])
    colour, shape = edited[index]["colour"], things[index]["shape"]
    src_img, edit_img = images
    src, edit = judge(src_img, n_things=2), judge(edit_img, n_things=2)
    row = {"kind": "blend", "method": "P2P + local blend" if s.blend else "P2P", "attribute": "colour",
           "prompt": s.prompt, "target": s.targets[0], "seed": s.seed,
           "success": float(any(r.colour == colour and r.shape == shape for r in edit.things)),
           "two_objects": float(len(src.things) == 2), "images": [src_img, edit_img]}
    if len(src.things) == 2:
        other = src.things[_assign(src.things, things)[1 - index]].mask
        row["psnr_other"] = psnr_in(src_img, edit_img, _dilate(other, 1))
        row["psnr_out"] = psnr_outside(src_img, edit_img, _dilate(src.things[0].mask | src.things[1].mask, 2))
    return [row]


def score_roundtrip(kind, s: EditSettings, scene: scenes.Scene, images) -> list[dict]:
    """The VAE round trip of a rendered scene: PSNR, and whether the judge reads every attribute of every thing
    (and the background) right on it (`all_read`) and on the rendering itself (`clean_read`)."""
    image, back = images
    _, masks = scenes.render(scene)

    def all_right(img) -> float:
        r = judge(img, n_things=len(scene.things))
        if r.background != scene.background or len(r.things) != len(scene.things):
            return 0.0
        pairs = match(masks, [t.mask for t in r.things])
        return float(all(getattr(r.things[j], a) == getattr(scene.things[i], a)
                         for i, j in pairs for a in scenes.ATTRIBUTES))
    return [{"kind": "vae", "prompt": scenes.caption(scene), "psnr": min(psnr(image, back), PSNR_CAP),
             "all_read": all_right(back), "clean_read": all_right(image), "images": [image, back]}]


SCORES = {"plain": score_plain, "swaps": score_swaps, "refine": score_refine, "fader": score_fader,
          "blend": score_blend, "vae": score_roundtrip}


def score(job: EvalJob, images) -> list[dict]:
    return SCORES[job.part](job.kind, job.settings, job.scene, images)


# --- the measures: one call, one case, flat rows -------------------------------------------------------------

def _measure(pipe, jobs: list[EvalJob]) -> list[dict]:
    return [row for job in jobs for row in score(job, run_job(pipe, job))]


def measure_plain(pipe, case: Case, steps: int | None = None) -> dict:
    """Plain generation of the case's prompt (`score_plain`)."""
    return _measure(pipe, jobs_plain(case, steps))[0]


def measure_swaps(pipe, case: Case, method: str = "P2P", attributes=SWAPS, cross_replace: float = 0.8,
                  steps: int | None = None) -> list[dict]:
    """Word swaps of the case (one row per attribute), with Prompt-to-Prompt (`Replace`, this cross_replace,
    the default self_replace) or the baseline (the prompts generated from the same seed, no control). The
    swaps that share a source prompt run in one batch."""
    return _measure(pipe, jobs_swaps(case, method, attributes, cross_replace, steps))


def measure_refine(pipe, case: Case, method: str = "P2P", steps: int | None = None) -> dict:
    """Refinement (`Refine`): the plain object of the scene gets the pattern word `case.pattern` added."""
    return _measure(pipe, jobs_refine(case, method, steps))[0]


def measure_fader(pipe, case: Case, attribute: str = "pattern", steps: int | None = None) -> dict:
    """The fader (`Reweight`) of the object's pattern or colour word at each c of FADER (`score_fader`)."""
    return _measure(pipe, jobs_fader(case, attribute, steps))[0]


def measure_blend(pipe, case: PairCase, blend: bool, steps: int | None = None) -> dict:
    """A colour swap of one object of a two-object scene, with local blend on its shape word or without
    (`score_blend`)."""
    return _measure(pipe, jobs_blend(case, blend, steps))[0]


def measure_roundtrip(pipe, scene: scenes.Scene) -> dict:
    """The VAE round trip D(E(x)) of the rendered scene (`score_roundtrip`)."""
    return _measure(pipe, jobs_roundtrip(scene))[0]


# --- the evaluation: every measure on every case, then averages per row kind ---------------------------------

PARTS = ("plain", "swaps", "refine", "fader", "blend", "vae")
GROUP = ("kind", "method", "attribute", "cross_replace")  # what a row of the tables is
TEXT = {"kind", "method", "attribute", "cross_replace", "prompt", "target", "word", "seed", "case", "images"}
FIELDS = ("case", "kind", "method", "attribute", "cross_replace", "word", "prompt", "target", "seed", *ATTRIBUTES,
          "all", "success", "kept", "two_objects", "iou", "shift", "psnr_other", "psnr_out",
          *(f"s@{c:g}" for c in FADER), "monotone", "psnr", "all_read", "clean_read")  # the order of a row's keys


def plan(n: int, seed: int = 0, parts=PARTS, steps: int | None = None) -> list[tuple[int, EvalJob]]:
    """(case index, job) pairs: every measure of `parts` on n cases of each kind, case by case."""
    jobs = []
    for k, case in enumerate(make_cases(n, seed)):
        on = lambda js: jobs.extend((k, j) for j in js)  # noqa: E731
        if "plain" in parts:
            on(jobs_plain(case, steps, k))
        if "swaps" in parts:
            on(jobs_swaps(case, "P2P", steps=steps, k=k))
            on(jobs_swaps(case, "baseline", steps=steps, k=k))
            on(jobs_swaps(case, "P2P", ("shape",), SHAPE_CROSS, steps, k))
        if "refine" in parts:
            on(jobs_refine(case, "P2P", steps, k))
            on(jobs_refine(case, "baseline", steps, k))
        if "fader" in parts:
            on(jobs_fader(case, "pattern", steps, k))
            on(jobs_fader(case, "colour", steps, k))
    if "blend" in parts:
        jobs += [(k, j) for k, case in enumerate(make_pair_cases(n, seed)) for b in (False, True)
                 for j in jobs_blend(case, b, steps, k)]
    if "vae" in parts:
        jobs += [(k, j) for k, (*_, s) in enumerate(scenes.sample(n, seed + 2)) for j in jobs_roundtrip(s, k)]
    return jobs


def example_name(row: dict) -> str:
    """examples/NAME.png of a row: its kind, method, attribute and cross_replace, and its case."""
    name = "_".join(str(row[g]) for g in GROUP if row.get(g) is not None).replace(" ", "")
    return f"{name}_{row['case']:03d}.png"


def save_example(row: dict, images, examples: Path) -> None:
    save_image(grid(images), examples / example_name(row), {"command": "eval", **_plain(row)})


def evaluate(pipe, n: int = 48, seed: int = 0, parts=PARTS, steps: int | None = None, progress: bool = True,
             examples: Path | None = None) -> list[dict]:
    """Run every measure of `parts` on n cases per row kind, in this process; the rows, each with the index of
    its case. `examples`: also write each row's images (source, edit, ...) there as one sheet per row.
    (`p2p eval` runs the same jobs as an experiment: `experiment_text`, `eval_rows`.)"""
    rows = []
    for k, job in tqdm(plan(n, seed, parts, steps), desc="eval", disable=not progress):
        for row in score(job, run_job(pipe, job)):
            row = {"case": k, **row}
            images = row.pop("images", [])
            if examples is not None and images:
                save_example(row, images, examples)
            rows.append(row)
    return rows


def _plain(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "images"}


# --- the evaluation as an experiment (p2p/experiments/) ------------------------------------------------------

def scene_table(scene: scenes.Scene) -> dict:
    """A scene as a TOML table (an experiment's `scene` of a "vae" job)."""
    return {"background": scene.background, "bg_kind": scene.bg_kind, "bg_seed": scene.bg_seed,
            "things": [{f.name: getattr(t, f.name) for f in fields(t)} for t in scene.things]}


def scene_from_table(d: dict) -> scenes.Scene:
    """`scene_table` read back; a ValueError names what is wrong."""
    try:
        things = tuple(scenes.Thing(**t) for t in d["things"])
        scene = scenes.Scene(things, d["background"], d["bg_kind"], int(d["bg_seed"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"a scene is a table {{ background, bg_kind, bg_seed, things = [{{ shape, colour, pattern, "
                         f"size, cx, cy, r, angle }}, ...] }} ({type(e).__name__}: {e})") from None
    allowed = {"shape": scenes.SHAPES, "colour": tuple(scenes.COLOURS), "pattern": scenes.PATTERNS,
               "size": scenes.SIZES}
    for t in things:
        for a, values in allowed.items():
            if getattr(t, a) not in values:
                raise ValueError(f"a scene's {a} {getattr(t, a)!r} is none of {', '.join(values)}")
    if scene.background not in scenes.COLOURS or scene.bg_kind not in scenes.BG_KINDS or not 1 <= len(things) <= 2:
        raise ValueError("a scene has 1 or 2 things, a background among the colours and a bg_kind among "
                         f"{', '.join(scenes.BG_KINDS)}")
    return scene


def _toml(value) -> str:
    """A TOML value on one line (strings, numbers, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))  # the shortest text that reads back as the same float
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k if re.fullmatch(r'[A-Za-z0-9_-]+', k) else json.dumps(k)} = {_toml(v)}"
                            for k, v in value.items()) + " }"


def experiment_text(n: int, seed: int = 0, parts=PARTS, steps: int | None = None, model: str = "embedded",
                    tokenizer: str | None = None) -> str:
    """The evaluation as an experiment file: the jobs of `plan`, in its order, one [[jobs]] table each (the
    settings that differ from the defaults, `kind` for a generation or a round trip, `scene` for the latter),
    measured by the eval_* measures of `parts` (p2p/experiments/measures.py)."""
    default = EditSettings("").to_dict()
    lines = [f"# p2p eval --n {n} --seed {seed} --parts {','.join(parts)}" + (f" --steps {steps}" if steps else ""),
             "# its jobs, as p2p/world/evaluate.py: experiment_text writes them; `p2p eval` with these flags runs them",
             "# and makes its tables; `p2p run` runs them as any experiment (the rows in results.jsonl, measures.eval)",
             f"description = {_toml(f'p2p eval: {n} cases per row kind, seed {seed}')}", f"model = {_toml(model)}"]
    lines += [f"tokenizer = {_toml(tokenizer)}"] if tokenizer else []
    lines.append(f"measures = {_toml([f'eval_{p}' for p in PARTS if p in parts])}")
    for _, job in plan(n, seed, parts, steps):
        lines += ["", "[[jobs]]", f"label = {_toml(job.label)}"]
        lines += [f"kind = {_toml(job.kind)}"] if job.kind != "edit" else []
        lines += [f"{k} = {_toml(v)}" for k, v in job.settings.to_dict().items() if v != default[k] or k == "prompt"]
        lines += [f"scene = {_toml(scene_table(job.scene))}"] if job.scene is not None else []
    return "\n".join(lines) + "\n"


def ordered(row: dict) -> dict:
    """The row's keys in the order the scores write them (FIELDS; others after)."""
    rank = {k: i for i, k in enumerate(FIELDS)}
    return dict(sorted(row.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def eval_rows(results: list[dict]) -> list[dict]:
    """The per-case rows of the eval_* measures in an experiment's result rows (results.jsonl), in its order,
    each with its case (the first word of the job's label) and `images`, the paths of the images it read."""
    rows = []
    for r in results:
        first = (r["axes"].get("job", "").split() or [""])[0]
        for row in r["measures"].get("eval", []):
            images = [r["images"][i] for i in row["images"]]
            rows.append({**ordered({"case": int(first) if first.isdigit() else None, **_plain(row)}),
                         "images": images})
    return rows


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

