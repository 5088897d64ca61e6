"""Running an edit (Algorithm 1): settings -> controller -> images, saved with their settings; sweeps.

    result = run_edit(pipe, EditSettings(...))            # result.images: [source, edit 1, ...]
    save_edit(result, "out/lion")                          # 0.png, 1.png, ..., grid.png
    sheet, results = sweep(pipe, settings, "cross_replace", [0.2, 0.4, 0.8])
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image

from models.errors import UserError

from p2p.files.output import grid, save_image

from .controller import Compose, Controller
from .inversion import Inversion
from .pipeline import Pipeline
from .settings import EditSettings, build_controller


@dataclass
class EditResult:
    settings: EditSettings  # resolved: every default filled in from the model
    images: list[Image.Image]  # [source, edit 1, ...]
    z_0: torch.Tensor
    controller: Controller  # the edit's controller (AttentionEdit, or Compose(edit, blend))


def run_edit(pipe: Pipeline, settings: EditSettings, *, controller: Controller | None = None,
             progress: bool = True, inversion: Inversion | None = None) -> EditResult:
    """The source and every edit denoised together from the seed's z_T, or, for a real image, from an
    `inversion`'s z_T with its unconditional embeddings (p2p/core/inversion.py): row 0 is then the
    reconstruction of the image, and the steps, guidance and size default to the inversion's.

    `controller` (e.g. an AttentionStore, or your own) runs after the edit's and sees the edited maps.
    """
    s = settings if inversion is None else inversion.settle(settings)
    s = s.resolved(pipe.cfg)
    edit = build_controller(s, pipe.tokenizer, s.steps, model=pipe.cfg)
    g = torch.Generator("cpu").manual_seed(s.seed)
    if inversion is None:
        inputs = {"z_T": pipe.initial_latent(g, s.height, s.width), "uncond": pipe.encode_negative(s.negative_prompt),
                  "controller": None}
    else:
        inputs = inversion.sampling_inputs(pipe, s.negative_prompt)
    inputs["controller"] = Compose(inputs["controller"], edit, controller)  # direct inversion's offsets first
    z_0 = pipe.denoise(cond=pipe.encode_text(s.prompts), steps=s.steps, eta=s.eta, generator=g,
                       guidance=s.guidance, low_memory=s.low_memory, progress=progress, **inputs)
    return EditResult(s, pipe.decode(z_0), z_0, edit)


def save_edit(result: EditResult, out_dir: str | Path, extra: dict | None = None) -> list[Path]:
    """0.png (the source), 1.png, ... and grid.png, each carrying the settings that reproduce it."""
    out_dir = Path(out_dir)
    settings = {"command": "edit", **result.settings.to_dict(), **(extra or {})}
    paths = [save_image(img, out_dir / f"{i}.png", {**settings, "index": i}) for i, img in enumerate(result.images)]
    sheet = grid(result.images, column_captions(result.settings))
    paths.append(save_image(sheet, out_dir / "grid.png", settings))
    return paths


def column_captions(s: EditSettings) -> list[str]:
    """The prompt of each image, with the fader values c of reweighted words when they vary by column."""
    captions = list(s.prompts)
    for word, c in s.reweight.items():
        values = list(c) if isinstance(c, (list, tuple)) else [c] * (len(captions) - 1)
        for b, v in enumerate(values, start=1):
            captions[b] += f" [{word} x{v:g}]"
    return captions


SWEEPABLE = "an edit setting (cross_replace, self_replace, blend_threshold, ...), reweight:WORD, cross_res or self_res"


def sweep_settings(pipe: Pipeline, settings: EditSettings, param: str, value) -> EditSettings:
    """The settings with `param` set to `value` (see `sweep`)."""
    if param.startswith("reweight:"):
        return replace(settings, reweight={**settings.reweight, param.split(":", 1)[1]: value})
    if param in ("cross_res", "self_res"):
        return settings.with_sites(param.removesuffix("_res"), pipe.cfg, res=tuple(value))
    if param in {f.name for f in fields(EditSettings)} - {"prompt", "targets"}:
        return replace(settings, **{param: value})
    raise UserError(f"cannot sweep {param!r}: use {SWEEPABLE}")


def short(value) -> str:
    """A sweep value as a caption: 0.4, "0.2,0.6" for a window, "16,8" for a set of resolutions."""
    if isinstance(value, (tuple, list)):
        return ",".join(short(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweep(pipe: Pipeline, settings: EditSettings, param: str, values: list, *, progress: bool = True,
          inversion: Inversion | None = None) -> tuple[Image.Image, list[EditResult]]:
    """One edit per value of a parameter; a grid with one row per edited prompt: the source, then the edit
    at each value (captioned "param = value")."""
    variants = [sweep_settings(pipe, settings, param, v) for v in values]  # every value checked before running
    results = [run_edit(pipe, s, progress=progress, inversion=inversion) for s in variants]
    name = param.split(":", 1)[1] + " c" if param.startswith("reweight:") else param
    captions = [f"{name} = {short(v)}" for v in values]
    cells, caps = [], []
    for b in range(1, len(results[0].images)):
        cells += [results[0].images[0]] + [r.images[b] for r in results]
        caps += ["source"] + captions
    return grid(cells, caps, rows=len(results[0].images) - 1), results
