"""`p2p eval`'s tables: the summaries of p2p/world/evaluate.py as Markdown, and issue 11's targets next to them.

    rows = evaluate(pipe, n=48)            # p2p/world/evaluate.py: per-case rows
    summary = aggregate(rows)              # one dict per row kind
    print(tables(summary))                 # Markdown: the measures, then the targets (measured, met or not)
    save(rows, summary, out_dir, n=48)     # eval.json (rows, summary, targets) and eval.md

A target is a bound on one measure of one row kind, absolute (colour swap success >= 90%) or relative to
another row kind (the baseline's mask IoU at most P2P's minus VISIBLE, the paper's claim that plain
generation of the target keeps little of the source's layout, Sec. 4; without local blend, the untouched
object's PSNR at least DRIFT below blend's, Sec. 3.2).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from p2p.world.evaluate import ATTRIBUTES, FADER, SHAPE_CROSS

VISIBLE = 0.10  # "the baseline's IoU is visibly lower": at least this much below P2P's
DRIFT = 1.0  # dB: "lower without [blend]": the untouched object's PSNR at least this much below blend's


@dataclass(frozen=True)
class Target:
    what: str  # as the issue says it
    key: tuple  # the row kind (kind, method, attribute, cross_replace)
    measure: str
    op: str  # ">=" or "<="
    bound: float  # absolute, or added to `ref`'s value of the same measure
    ref: tuple | None = None
    percent: bool = True  # shown as a percentage


def _targets() -> list[Target]:
    t = [Target("VAE round trip PSNR (dB)", ("vae", None, None, None), "psnr", ">=", 32.0, percent=False),
         Target("VAE round trips with every attribute read right", ("vae", None, None, None), "all_read", ">=", 0.98)]
    for a, bound in zip(ATTRIBUTES, (0.95, 0.95, 0.85, 0.95, 0.98)):
        t.append(Target(f"plain generation: {a} read right", ("plain", None, None, None), a, ">=", bound))
    for a in ("colour", "pattern", "background"):
        p2p = ("swap", "P2P", a, 0.8)
        t += [Target(f"{a} swap, P2P: success", p2p, "success", ">=", 0.90),
              Target(f"{a} swap, P2P: mask IoU", p2p, "iou", ">=", 0.85, percent=False),
              Target(f"{a} swap, P2P: other attributes kept", p2p, "kept", ">=", 0.95),
              Target(f"{a} swap, baseline: mask IoU visibly lower (P2P's - {VISIBLE:.2f})", ("swap", "baseline", a, None), "iou", "<=",
                     -VISIBLE, ref=p2p, percent=False)]
    for cross in (0.8, SHAPE_CROSS):
        key = ("swap", "P2P", "shape", cross)
        t += [Target(f"shape swap, P2P cross_replace {cross}: success", key, "success", ">=", 0.80),
              Target(f"shape swap, P2P cross_replace {cross}: centroid shift (px)", key, "shift", "<=", 2.0,
                     percent=False)]
    refine = ("refine", "P2P", "pattern", None)
    t += [Target("refinement adds the pattern", refine, "success", ">=", 0.80),
          Target("refinement: mask IoU", refine, "iou", ">=", 0.85, percent=False)]
    for a in ("pattern", "colour"):
        key = ("fader", None, a, None)
        t += [Target(f"fader ({a}): monotone in c", key, "monotone", ">=", 0.80),
              Target(f"fader ({a}): strength at c=3 / at c=-1", key, "ratio", ">=", 2.0, percent=False)]
    blend = ("blend", "P2P + local blend", "colour", None)
    t += [Target("local blend: untouched object's PSNR (dB)", blend, "psnr_other", ">=", 40.0, percent=False),
          Target(f"without blend: untouched object's PSNR lower (with blend's - {DRIFT:g} dB)",
                 ("blend", "P2P", "colour", None), "psnr_other", "<=", -DRIFT, ref=blend, percent=False)]
    return t


TARGETS = _targets()


def _find(summary: list[dict], key: tuple) -> dict | None:
    return next((s for s in summary if (s["kind"], s.get("method"), s.get("attribute"), s.get("cross_replace")) == key),
                None)


def _fmt(v, percent: bool = False, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.0%}" if percent else f"{v:.{digits}f}"


def check_targets(summary: list[dict]) -> list[dict]:
    """Each target with its measured value, its bound (resolved where relative) and whether it is met
    (None where not measured)."""
    out = []
    for t in TARGETS:
        s, ref = _find(summary, t.key), _find(summary, t.ref) if t.ref else None
        value = s.get(t.measure) if s else None
        base = ref.get(t.measure) if ref else None  # a reference row may lack the measure (no object found)
        bound = t.bound if not t.ref else t.bound + base if base is not None else None
        met = None
        if value is not None and bound is not None and not (math.isnan(value) or math.isnan(bound)):
            met = value >= bound if t.op == ">=" else value <= bound
        out.append({"what": t.what, "measured": value, "op": t.op, "bound": bound, "met": met,
                    "percent": t.percent, "n": s["n"] if s else 0})
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def tables(summary: list[dict]) -> str:
    """The summaries as Markdown tables, one per kind of measure, then the targets."""
    kind = lambda k: [s for s in summary if s["kind"] == k]  # noqa: E731
    out = []
    for s in kind("plain"):
        out += ["Plain generation, attributes read back from the image:", "",
                *_table(["n", *ATTRIBUTES, "all", "objects counted right"],
                        [[str(s["n"]), *(_fmt(s.get(a), True) for a in (*ATTRIBUTES, "all", "count"))]]), ""]
    swaps = kind("swap") + kind("refine")
    if swaps:
        out += ["Word swaps and refinement (P2P: replace or refine, self_replace 0.4; baseline: the target prompt "
                "from the same seed; IoU, shift and PSNR outside the object against the source):", ""]
        rows = [[s["attribute"] if s["kind"] == "swap" else "refine: + pattern", s["method"],
                 _fmt(s.get("cross_replace"), digits=1), str(s["n"]), _fmt(s.get("success"), True), _fmt(s.get("iou")),
                 _fmt(s.get("shift"), digits=1), _fmt(s.get("kept"), True), _fmt(s.get("psnr_out"), digits=1)]
                for s in swaps]
        out += [*_table(["edit", "method", "cross_replace", "n", "success", "mask IoU", "centroid shift (px)",
                         "other attributes kept", "PSNR outside (dB)"], rows), ""]
    if kind("fader"):
        cs = [f"{c:g}" for c in FADER]
        out += ["Fader (reweight the word by c; strength in the source's object mask: pattern contrast "
                "(L90 - L10) / L90, colour saturation):", ""]
        rows = [[s["attribute"], str(s["n"]), _fmt(s.get("monotone"), True), *(_fmt(s.get(f"s@{c}"), digits=3) for c in cs),
                 _fmt(s["ratio"])] for s in kind("fader")]
        out += [*_table(["word", "n", "monotone in c", *(f"c={c}" for c in cs), "c=3 / c=-1"], rows), ""]
    if kind("blend"):
        out += ["Local blend on two-object scenes (one object's colour swapped, blend on its shape word):", ""]
        rows = [[s["method"], str(s["n"]), _fmt(s.get("two_objects"), True), _fmt(s.get("success"), True),
                 _fmt(s.get("psnr_other"), digits=1), _fmt(s.get("psnr_out"), digits=1)] for s in kind("blend")]
        out += [*_table(["method", "n", "source shows two objects", "edit success", "untouched object PSNR (dB)",
                         "PSNR outside both (dB)"], rows), ""]
    for s in kind("vae"):
        out += ["VAE round trip D(E(x)) of rendered scenes:", "",
                *_table(["n", "PSNR (dB)", "judge reads all (round trip)", "judge reads all (rendering)"],
                        [[str(s["n"]), _fmt(s.get("psnr"), digits=1), _fmt(s.get("all_read"), True),
                          _fmt(s.get("clean_read"), True)]]), ""]
    checked = [t for t in check_targets(summary) if t["n"]]
    if checked:
        mark = {True: "yes", False: "**no**", None: "-"}
        rows = [[t["what"], str(t["n"]), _fmt(t["measured"], t["percent"]), f"{t['op']} {_fmt(t['bound'], t['percent'])}",
                 mark[t["met"]]] for t in checked]
        met = sum(t["met"] is True for t in checked)
        out += [f"Targets (issue 11; met {met} of {len(checked)}):", "",
                *_table(["target", "n", "measured", "target", "met"], rows)]
    return "\n".join(out).rstrip() + "\n"


def _clean(d: dict) -> dict:
    """JSON has no nan or inf: None there; no images."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items() if k != "images"}


def save(rows: list[dict], summary: list[dict], out_dir: Path, **meta) -> None:
    """eval.json (meta, the summary, the targets, the per-case rows) and eval.md (the tables) in out_dir, each
    written whole."""
    d = {**meta, "summary": [_clean(s) for s in summary], "targets": [_clean(t) for t in check_targets(summary)],
         "rows": [_clean(r) for r in rows]}
    for name, text in (("eval.json", json.dumps(d, indent=1) + "\n"), ("eval.md", tables(summary))):
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"  # written whole: a temporary name, renamed when written
        try:
            tmp.write_text(text)
            os.replace(tmp, out_dir / name)
        finally:
            tmp.unlink(missing_ok=True)
