"""Measurements recorded for each job of an experiment: a registry of named functions.

A measure reads one finished edit (`Outcome`: the resolved settings, the images [source, edit 1, ...], the
edit's controller, and an `AttentionStore` of the maps it asked for) and returns JSON numbers, one value per
edited image where that makes sense. Add one with

    register(Measure("my_measure", my_function, needs_maps=True))

Built in:

- `psnr_outside`: PSNR (dB) between the source and each edit outside the edited region. The region is the
  local blend's mask when the job blends, else the cross-attention map of the edited words (those that
  differ between the source and the target, or the reweighted words), thresholded as local blend does
  (3x3 max-pool, normalised, > 0.3, at the model's blend resolution) and upsampled to the image. Also
  `edited_fraction`, the share of pixels in the region.
- `attention`: for the edited words of each prompt, their step- and head-averaged cross-attention map at the
  blend resolution: `attn_entropy` (normalised entropy, 1 = uniform), `attn_peak` (max over mean) and
  `attn_shift` (half the L1 distance between the source's and the edit's normalised maps: 0 same place,
  1 disjoint).
- `judge` (the embedded scene model only): the judge's reading (p2p/world/judge.py) of the source and each
  edit (shape, colour, pattern, size of the largest object, background), the object mask IoU and centroid
  shift between source and edit, `success`: whether the judge reads each changed word in the edit, and
  `psnr_outside_objects`: the PSNR outside the objects the judge finds in either image (grown by 2 px), as
  `p2p eval` measures it. (On the embedded model the maps of colour and size words cover most of the 8x8
  grid, so `psnr_outside` often finds no pixel outside the region; this one does.)
- `eval_plain`, `eval_swaps`, `eval_refine`, `eval_fader`, `eval_blend`, `eval_vae` (the embedded scene model
  only): `p2p eval`'s measures (p2p/world/evaluate.py: score_*), each on the jobs it scores (evaluate.part_of: a
  generation without targets, word swaps and their baseline, refinement, the fader, two-object swaps, round
  trips). `eval` is the list of its rows, as `p2p eval` makes them, with `images` the indices of the job's
  images each row read; `p2p eval` runs these as an experiment (p2p/cli/commands.py: cmd_eval).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.errors import UserError

from p2p.core.local_blend import LocalBlend, threshold_mask, word_mask
from p2p.core.sites import p2p_defaults
from p2p.core.store import AttentionStore
from p2p.files.images import psnr

from p2p.world import evaluate

from .spec import _words


@dataclass(frozen=True)
class Measure:
    name: str
    fn: Callable  # (outcome, pipe) -> dict of JSON values
    needs_maps: bool = False  # the job runs with an AttentionStore of the blend-resolution cross maps
    embedded_only: bool = False  # reads scene images: only the embedded model's
    applies: Callable = lambda job: job.kind != "vae"  # (Job) -> whether it measures this job (else it is skipped)


MEASURES: dict[str, Measure] = {}


def register(measure: Measure) -> Measure:
    MEASURES[measure.name] = measure
    return measure


def store_sites(names, pipe):
    """The sites whose maps the measures `names` need (cross-attention at the model's blend sites), or None."""
    return p2p_defaults(pipe.cfg).blend_sites if any(MEASURES[n].needs_maps for n in names) else None


def store_for(names, pipe) -> AttentionStore | None:
    """The attention store the measures `names` need, or None."""
    sites = store_sites(names, pipe)
    return None if sites is None else AttentionStore(sites)


def measure(names, outcome, pipe) -> dict:
    """Every measure of `names` on one job, merged into one dict."""
    out = {}
    for n in names:
        if MEASURES[n].applies(outcome.job):
            out.update(MEASURES[n].fn(outcome, pipe))
    return out


def check_measures(names, model: str) -> None:
    """Refuse, before the model loads, a measure that cannot run on this model."""
    from p2p.cli.checks import is_embedded

    for n in names:
        if MEASURES[n].embedded_only and not is_embedded(model):
            raise UserError(f"measure {n!r} reads images of the embedded scene model; drop it for model {model!r}")


# --- which words an edit changes -----------------------------------------------------------------------

def edited_words(settings, b: int) -> tuple[list[str], list[str]]:
    """(words of the source, words of edit b) that the edit changes: a word swap's differing words, a
    refinement's added words, and reweighted words (in both)."""
    src, tgt = _words(settings.prompt), _words(settings.prompts[b])
    if len(src) == len(tgt):
        changed = [i for i, (a, c) in enumerate(zip(src, tgt)) if a != c]
        old, new = [src[i] for i in changed], [tgt[i] for i in changed]
    else:
        old, new = [w for w in src if w not in tgt], [w for w in tgt if w not in src]
    extra = list(settings.reweight)
    return list(dict.fromkeys(old + extra)), list(dict.fromkeys(new + extra))


def region_masks(outcome, pipe) -> torch.Tensor:
    """(B, H, W) bool per image: the edited region of each edit (the union with the source's; row 0: the union
    of all). From the local blend's mask, else from the maps of the edited words in the store."""
    r = outcome.result
    W, H = r.images[0].size
    latent = (H // pipe.cfg.vae_scale, W // pipe.cfg.vae_scale)
    ctl = r.controller
    blend = next((c for c in getattr(ctl, "controllers", []) if isinstance(c, LocalBlend)), None)
    if blend is not None:
        m = blend.mask(latent)[:, 0].bool()
    else:
        store, prompts = outcome.store, r.settings.prompts
        sites = store.select("cross", store.sites)
        maps = torch.stack([store.average(s) for s in sites])  # (layers, B, h, w, 77)
        rows = []
        for b in range(1, len(prompts)):
            old, new = edited_words(r.settings, b)
            words = [[w for w in old if w in _words(prompts[0])], [w for w in new if w in _words(prompts[b])]]
            if not words[0] and not words[1]:
                rows.append(torch.zeros(latent, dtype=torch.bool))
                continue
            tokens = torch.zeros(2, 77)
            for i, (p, ws) in enumerate(zip((prompts[0], prompts[b]), words)):
                if ws:
                    tokens[i] = word_mask(pipe.tokenizer, [p], ws, "psnr_outside")[0]
            pair = maps[:, [0, b]]
            m = threshold_mask(pair, tokens, latent, pool=True, threshold=r.settings.blend_threshold)
            rows.append(m[1, 0])
        m = torch.stack([torch.stack(rows).any(0)] + rows)
    return F.interpolate(m[:, None].float(), size=(H, W), mode="nearest")[:, 0].bool()


def psnr_outside(outcome, pipe) -> dict:
    images = outcome.result.images
    masks = region_masks(outcome, pipe).cpu().numpy()
    src = np.asarray(images[0])
    values, fractions = [], []
    for b in range(1, len(images)):
        keep = ~masks[b]
        values.append(min(psnr(src[keep], np.asarray(images[b])[keep]), 99.0) if keep.any() else float("nan"))
        fractions.append(float(masks[b].mean()))
    return {"psnr_outside": values, "edited_fraction": fractions}


def attention_stats(outcome, pipe) -> dict:
    r, store = outcome.result, outcome.store
    prompts = r.settings.prompts
    maps = store.aggregate("cross", store.sites)  # (B, h, w, 77)
    entropy, peak, shift = [], [], []

    def word_map(b: int, words: list[str]) -> torch.Tensor | None:
        words = [w for w in words if w in _words(prompts[b])]
        if not words:
            return None
        m = (maps[b] * word_mask(pipe.tokenizer, [prompts[b]], words, "attention")[0]).sum(-1).flatten()
        return m / m.sum().clamp_min(1e-12)

    for b in range(1, len(prompts)):
        old, new = edited_words(r.settings, b)
        a, e = word_map(0, old), word_map(b, new)
        if e is None:
            entropy.append(float("nan")), peak.append(float("nan")), shift.append(float("nan"))
            continue
        n = e.numel()
        entropy.append(float(-(e * e.clamp_min(1e-12).log()).sum() / math.log(n)))
        peak.append(float(e.max() * n))
        shift.append(float(0.5 * (a - e).abs().sum()) if a is not None else float("nan"))
    return {"attn_entropy": entropy, "attn_peak": peak, "attn_shift": shift}


def judge_readout(outcome, pipe) -> dict:
    from p2p.world import scenes
    from p2p.world.judge import centroid_shift, iou, judge

    r = outcome.result
    n = 2 if " and " in r.settings.prompt else 1
    readings = [judge(img, n_things=n) for img in r.images]

    def as_dict(reading):
        t = reading.things[0] if reading.things else None
        return {"background": reading.background, **{k: getattr(t, k) if t else None
                                                     for k in ("shape", "colour", "pattern", "size")}}

    read = [as_dict(x) for x in readings]
    groups = {"shape": scenes.SHAPES, "colour": tuple(scenes.COLOURS), "pattern": scenes.PATTERNS,
              "size": scenes.SIZES}
    success, ious, shifts, outside = [], [], [], []
    src = np.asarray(r.images[0])
    for b in range(1, len(r.images)):
        tgt = _words(r.settings.prompts[b])
        _, new = edited_words(r.settings, b)
        hits = []
        for w in new:
            if w in tgt and tgt.index(w) + 1 < len(tgt) and tgt[tgt.index(w) + 1] == "background":
                hits.append(read[b]["background"] == w)
            else:
                hits += [read[b][attr] == w for attr, words in groups.items() if w in words]
        success.append(float(all(hits)) if hits else float("nan"))
        a, e = readings[0].things, readings[b].things
        ious.append(iou(a[0].mask, e[0].mask) if a and e else float("nan"))
        shifts.append(centroid_shift(a[0].mask, e[0].mask) if a and e else float("nan"))
        objects = dilate(np.any([t.mask for t in a + e], axis=0)) if a or e else np.zeros(src.shape[:2], bool)
        keep = ~objects
        outside.append(min(psnr(src[keep], np.asarray(r.images[b])[keep]), 99.0) if keep.any() else float("nan"))
    return {"judge": read, "success": success, "mask_iou": ious, "centroid_shift": shifts,
            "psnr_outside_objects": outside}


def dilate(mask: np.ndarray, r: int = 2) -> np.ndarray:
    """The mask grown by r pixels (a square neighbourhood), without wrapping around the edges."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] |= \
                mask[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


register(Measure("psnr_outside", psnr_outside, needs_maps=True))
register(Measure("attention", attention_stats, needs_maps=True))
register(Measure("judge", judge_readout, embedded_only=True))


def scene_eval(part: str) -> Callable:
    """The measure of one of `p2p eval`'s parts: its score of the job's images, the rows' images as indices."""
    def fn(outcome, pipe) -> dict:
        job, r = outcome.job, outcome.result
        scene = evaluate.scene_from_table(job.scene) if job.scene else None
        rows = evaluate.SCORES[part](job.kind, r.settings, scene, r.images)
        for row in rows:
            row["images"] = [next(i for i, x in enumerate(r.images) if x is img) for img in row["images"]]
        return {"eval": rows}
    return fn


for _part in evaluate.PARTS:
    register(Measure(f"eval_{_part}", scene_eval(_part), embedded_only=True,
                     applies=lambda job, part=_part: evaluate.part_of(job.kind, job.settings) == part))
