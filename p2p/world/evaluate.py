"""A miniature of the paper's claims, measured on the embedded scene model (`p2p eval`).

The paper shows (Sec. 4, Figs. 3-8) that injecting the source's cross-attention maps M into the
generation of an edited prompt P* changes what the prompt edit asks for while keeping the layout, where
plain generation of P* from the same seed keeps little. Here the images come from the procedural scene
generator's world (p2p/world/scenes.py), so an analytic reader of attributes and object masks (p2p/world/judge.py)
can score every image without a human:

- text alignment of plain generation: the attributes of the prompt read back from its image;
- word swaps of the object's shape, colour or pattern and of the background colour, Prompt-to-Prompt
  (replace, the authors' defaults) against the baseline (the target prompt, same seed, no control):
  edit success (the judge reads the new value), the object mask IoU and centroid shift between the source
  and the edit, and the other attributes kept;
- local blend (Sec. 3.2) on object edits: PSNR between source and edit outside the two object masks;
- the fader (reweighting, Sec. 3.2): the pattern word's weight c against the pattern contrast inside the
  object, monotone in c if reweighting works.

Every case is fixed by `seed`: scenes drawn from the generator's single-object distribution, the swapped
values and the sampling seed derived from it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from p2p.world import scenes
from p2p.core.settings import EditSettings
from p2p.files.output import grid, save_image
from p2p.core.run import run_edit
from p2p.files.images import psnr
from p2p.world.judge import centroid_shift, iou, judge

SWAPS = ("shape", "colour", "pattern", "background")
OBJECT_SWAPS = ("shape", "colour", "pattern")
FADER = (-1.0, 0.0, 1.0, 2.0, 3.0)  # c of the pattern word; 1 is the source itself


@dataclass(frozen=True)
class Case:
    scene: scenes.Scene
    seed: int  # of z_T
    swaps: dict  # attribute -> the value it is swapped to

    @property
    def prompt(self) -> str:
        return scenes.caption(self.scene)

    def target(self, attribute: str) -> str:
        return scenes.caption(scenes.with_attribute(self.scene, 0, attribute, self.swaps[attribute]))


def make_cases(n: int, seed: int = 0) -> list[Case]:
    """n single-object scenes with a swap value for every attribute that a one-word swap can change
    (a plain object has no pattern word, so it gets no pattern swap)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = scenes.sample_scene(rng, max_things=1)
        t = scene.things[0]
        options = {
            "shape": [s for s in scenes.SHAPES if s != t.shape],
            "colour": [c for c in scenes.COLOURS if c not in (t.colour, scene.background)],
            "pattern": [p for p in scenes.PATTERNS if p not in ("plain", t.pattern)] if t.pattern != "plain" else [],
            "background": [c for c in scenes.COLOURS if c not in (t.colour, scene.background)],
        }
        swaps = {a: v[rng.integers(len(v))] for a, v in options.items() if v}
        out.append(Case(scene, int(rng.integers(2**31)), swaps))
    return out


# --- measurements on one image pair ------------------------------------------------------------------------

def read(image) -> dict:
    """The judge's reading of a one-object image as a dict; attributes None where it finds no object."""
    r = judge(image, n_things=1)
    if not r.things:
        return {"background": r.background, "shape": None, "colour": None, "pattern": None, "size": None,
                "mask": np.zeros(np.asarray(image).shape[:2], bool)}
    t = r.things[0]
    return {"background": r.background, "shape": t.shape, "colour": t.colour, "pattern": t.pattern,
            "size": t.size, "mask": t.mask}


def psnr_outside(a, b, mask: np.ndarray) -> float:
    """PSNR (dB) between two images over the pixels where `mask` is False (99 where they are equal there)."""
    keep = ~mask
    if not keep.any():
        return float("nan")
    return min(psnr(np.asarray(a)[keep], np.asarray(b)[keep]), 99.0)


def dilate(mask: np.ndarray, r: int = 2) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def pattern_contrast(image, mask: np.ndarray) -> float:
    """Share of the object's pixels much darker than its bright part (stripes and dots are drawn at half
    the object's colour): a pattern's strength, read without deciding which pattern it is."""
    if mask.sum() < 10:
        return float("nan")
    lum = np.asarray(image, np.float32)[mask] @ np.array([0.299, 0.587, 0.114], np.float32)
    return float((lum < 0.75 * np.percentile(lum, 90)).mean())


def compare(src: dict, src_img, edit_img, attribute: str, value: str) -> dict:
    e = read(edit_img)
    row = {"success": float(e[attribute] == value)}
    others = [a for a in SWAPS if a != attribute]
    row["kept"] = float(np.mean([e[a] == src[a] for a in others]))
    if src["mask"].any() and e["mask"].any():
        row["iou"] = iou(src["mask"], e["mask"])
        row["shift"] = centroid_shift(src["mask"], e["mask"])
        if attribute != "background":
            row["psnr_out"] = psnr_outside(src_img, edit_img, dilate(src["mask"] | e["mask"]))
    return row


# --- the evaluation ----------------------------------------------------------------------------------------

@dataclass
class Report:
    n: int
    steps: int
    alignment: dict = field(default_factory=dict)  # attribute -> accuracy of plain generation
    swaps: dict = field(default_factory=dict)  # (method, attribute) -> {metric: mean}
    fader: dict = field(default_factory=dict)  # c -> mean pattern contrast; "monotone" -> share of cases

    def table(self) -> str:
        """The results as Markdown tables (the README's)."""
        lines = [f"Plain generation, attributes read back from the image ({self.n} prompts):", "",
                 "| " + " | ".join(self.alignment) + " |", "|" + "---|" * len(self.alignment),
                 "| " + " | ".join(f"{v:.0%}" for v in self.alignment.values()) + " |", "",
                 "Word swaps (P2P: replace, cross 0.8, self 0.4; baseline: target prompt, same seed):", "",
                 "| swap | method | n | success | mask IoU | centroid shift (px) | other attributes kept | PSNR outside (dB) |",
                 "|---|---|---|---|---|---|---|---|"]
        for (method, attribute), m in self.swaps.items():
            cell = lambda k, f: "-" if k not in m or m[k] != m[k] else format(m[k], f)  # noqa: E731
            lines.append(f"| {attribute} | {method} | {m['n']} | {cell('success', '.0%')} | {cell('iou', '.2f')} | "
                         f"{cell('shift', '.1f')} | {cell('kept', '.0%')} | {cell('psnr_out', '.1f')} |")
        if self.fader:
            cs = [c for c in self.fader if c != "monotone" and c != "n"]
            lines += ["", f"Fader: pattern contrast inside the object against the pattern word's weight c "
                      f"({self.fader['n']} patterned prompts; monotone in {self.fader['monotone']:.0%} of them):", "",
                      "| c | " + " | ".join(cs) + " |", "|---|" + "---|" * len(cs),
                      "| contrast | " + " | ".join(f"{self.fader[c]:.3f}" for c in cs) + " |"]
        return "\n".join(lines)


def _mean(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    return {"n": len(rows), **{k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys}}


def evaluate(pipe, n: int = 24, seed: int = 0, steps: int | None = None, progress: bool = True,
             examples: Path | None = None) -> Report:
    """Run the evaluation on `n` scenes; `examples`: a folder for a grid per case (source, P2P, baseline)."""
    steps = steps or pipe.cfg.steps
    report = Report(n, steps)
    align, rows, fader = [], {}, []
    for k, case in enumerate(tqdm(make_cases(n, seed), desc="eval", disable=not progress)):
        attrs = [a for a in SWAPS if a in case.swaps]
        targets = tuple(case.target(a) for a in attrs)
        base = EditSettings(case.prompt, targets, seed=case.seed, steps=steps)
        p2p = run_edit(pipe, base, progress=False).images
        src_img, src = p2p[0], read(p2p[0])
        t = case.scene.things[0]
        truth = {"shape": t.shape, "colour": t.colour, "pattern": t.pattern, "size": t.size,
                 "background": case.scene.background}
        align.append({a: float(src[a] == v) for a, v in truth.items()})
        plain = pipe.generate(list(targets), seed=case.seed, steps=steps, progress=False)
        obj = [a for a in attrs if a in OBJECT_SWAPS]
        blend_targets = tuple(case.target(a) for a in obj)
        words = [[t.shape]] + [[case.swaps["shape"] if a == "shape" else t.shape] for a in obj]
        blended = run_edit(pipe, EditSettings(case.prompt, blend_targets, blend=tuple(words), seed=case.seed,
                                              steps=steps), progress=False).images[1:]
        for method, images in (("P2P", p2p[1:]), ("baseline", plain)):
            for a, img in zip(attrs, images):
                rows.setdefault((method, a), []).append(compare(src, src_img, img, a, case.swaps[a]))
        for a, img in zip(obj, blended):
            rows.setdefault(("P2P + local blend", a), []).append(compare(src, src_img, img, a, case.swaps[a]))
        if t.pattern != "plain":
            s = EditSettings(case.prompt, (case.prompt,) * len(FADER), mode="reweight",
                             reweight={t.pattern: list(FADER)}, seed=case.seed, steps=steps)
            faded = run_edit(pipe, s, progress=False).images[1:]
            fader.append([pattern_contrast(img, src["mask"]) for img in faded])
        if examples is not None:
            sheet = grid([src_img, *p2p[1:], src_img, *plain],  # row 1: P2P, row 2: the baseline
                         ["source", *[f"P2P {a}" for a in attrs], "source", *[f"baseline {a}" for a in attrs]], rows=2)
            save_image(sheet, examples / f"{k:03d}.png",
                       {"command": "eval", "prompt": case.prompt, "targets": list(targets), "seed": case.seed,
                        "steps": steps})
    report.alignment = {a: float(np.mean([r[a] for r in align])) for a in align[0]}
    order = [("P2P", a) for a in SWAPS] + [("baseline", a) for a in SWAPS] + [("P2P + local blend", a) for a in OBJECT_SWAPS]
    report.swaps = {key: _mean(rows[key]) for key in sorted(rows, key=order.index)}
    if fader:
        f = np.array(fader)
        ok = ~np.isnan(f).any(axis=1)
        report.fader = {"n": int(ok.sum()), **{f"{c:g}": float(f[ok, i].mean()) for i, c in enumerate(FADER)},
                        "monotone": float(np.mean([np.all(np.diff(r) >= 0) for r in f[ok]])) if ok.any() else 0.0}
    return report


def save(report: Report, path: Path) -> None:
    d = {"n": report.n, "steps": report.steps, "alignment": report.alignment, "fader": report.fader,
         "swaps": [{"method": m, "attribute": a, **v} for (m, a), v in report.swaps.items()]}
    path.write_text(json.dumps(d, indent=2) + "\n")
