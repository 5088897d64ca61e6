"""Prompt-to-Prompt editing from the Python API: settings -> controller -> images, and sweeps.

    from p2p.edit import EditSettings, run_edit
    s = EditSettings("a cat riding a bicycle", targets=("a cat riding a car",), mode="replace", seed=8888)
    result = run_edit(pipe, s)          # result.images[0] is the source, [1:] the edits

Defaults are the authors' (cross-attention injection for 80% of the steps, self-attention for 40%
on layers with at most 16 x 16 keys, local blend threshold 0.3), so published settings reproduce.
An `EditSettings` can be read from a TOML file (configs/edits/) and is written into every PNG.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .align import refine_mappers, replace_mappers
from .blend import LocalBlend
from .controllers import AttentionStore, SiteSelection
from .edits import Edit, Refine, Replace, Reweight, as_window, cross_schedule, self_window
from models.presets import PRESETS, ModelConfig

from .inversion import Inversion
from .pipeline import Pipeline, save_png

MODES = ("replace", "refine", "reweight")


@dataclass(frozen=True)
class EditSettings:
    prompt: str  # the source prompt P
    targets: tuple[str, ...] = ()  # the edited prompts P*; for mode "reweight", the prompt itself by default
    mode: str = "replace"  # "replace" (word swap) | "refine" (added words) | "reweight" (fader)
    cross_replace: float | tuple | dict = 0.8  # tau: fraction (or window, or per-word dict) of injected steps
    self_replace: float | tuple = 0.4  # fraction (or window) of steps with self-attention injection
    reweight: dict = field(default_factory=dict)  # word -> c (or one c per target); chained on replace/refine
    blend: tuple = ()  # local blend words (of the source and the targets)
    blend_subtract: tuple = ()  # words cut out of the blend mask
    blend_threshold: float = 0.3
    blend_start: float = 0.0  # fraction of steps before blending starts (null-text notebook: 0.2)
    blend_res: int | None = None  # native side of the maps the mask is made from (None: the model's, SD v1 16)
    cross_sites: SiteSelection = SiteSelection()  # where cross-attention is injected (ablations)
    self_sites: SiteSelection = SiteSelection()
    self_max_keys: float | None = None  # self-injection only where keys <= this (None: the model's, SD v1 256; inf: all)
    seed: int = 0
    steps: int | None = None  # None: the model's default (50)
    guidance: float | None = None  # None: the model's default (7.5 for SD v1)
    height: int | None = None
    width: int | None = None
    eta: float = 0.0
    negative_prompt: str = ""
    low_memory: bool = False

    @property
    def prompts(self) -> list[str]:
        targets = self.targets or ((self.prompt,) if self.mode == "reweight" else ())
        return [self.prompt, *targets]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> EditSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown edit settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        d = dict(d)
        for k in ("cross_sites", "self_sites"):
            if isinstance(d.get(k), dict):
                d[k] = SiteSelection(**{n: tuple(v) if isinstance(v, list) else v for n, v in d[k].items()})
        for k in ("targets", "blend", "blend_subtract", "self_replace"):
            if isinstance(d.get(k), list):
                d[k] = tuple(tuple(x) if isinstance(x, list) else x for x in d[k])
        if isinstance(d.get("cross_replace"), list):
            d["cross_replace"] = tuple(d["cross_replace"])
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> EditSettings:
        with open(path, "rb") as f:
            return cls.from_dict(tomllib.load(f))


def check(settings: EditSettings, tokenizer) -> None:
    """Raise a ValueError naming the problem for settings that cannot make a meaningful edit."""
    s = settings
    if s.mode not in MODES:
        raise ValueError(f"unknown edit mode {s.mode!r}; use one of {', '.join(MODES)}")
    if s.mode != "reweight" and not s.targets:
        raise ValueError(f"mode {s.mode!r} needs at least one target prompt")
    if s.mode == "reweight":
        if not s.reweight:
            raise ValueError("mode 'reweight' needs words to reweight, e.g. reweight={'snowy': 2.0}")
        if any(t != s.prompt for t in s.targets):
            raise ValueError("mode 'reweight' edits the prompt itself (targets equal to the prompt); to reweight "
                             "words of a changed prompt, use mode 'replace' or 'refine' with reweight=...")
    as_window(s.self_replace, "self_replace")
    for v in (s.cross_replace.values() if isinstance(s.cross_replace, dict) else [s.cross_replace]):
        as_window(v, "cross_replace")
    for p in s.prompts:
        n = tokenizer.count(p)
        if n > 77:
            raise ValueError(f"the prompt {p!r} is {n} tokens, more than the 77 the text encoder takes; "
                             "shorten it (an edit aligns tokens, so it cannot run on a truncated prompt)")


def build_controller(settings: EditSettings, tokenizer, steps: int, store: AttentionStore | None = None,
                     model: ModelConfig = PRESETS["sd-v1"]) -> Edit:
    """The Edit controller of the settings, for a sampler of `steps` steps; `model` gives the defaults that
    depend on the network's resolutions."""
    check(settings, tokenizer)
    s, prompts = settings, settings.prompts
    source, targets = prompts[0], prompts[1:]
    edit = None
    if s.mode == "replace":
        edit = Replace(replace_mappers(tokenizer, source, targets))
    elif s.mode == "refine":
        edit = Refine(*refine_mappers(tokenizer, source, targets))
    if s.reweight:
        edit = Reweight(equalizer(tokenizer, targets, s.reweight), previous=edit)
    blend = None
    if s.blend:
        blend = LocalBlend(tokenizer, prompts, list(s.blend), steps, subtract=list(s.blend_subtract),
                           threshold=s.blend_threshold, start=s.blend_start,
                           res=model.blend_res if s.blend_res is None else s.blend_res)
    return Edit(edit, cross_schedule(tokenizer, prompts, steps, s.cross_replace), self_window(steps, s.self_replace),
                cross_sites=s.cross_sites, self_sites=s.self_sites, blend=blend,
                self_max_keys=model.self_max_keys if s.self_max_keys is None else s.self_max_keys,
                store=store)


def equalizer(tokenizer, targets: list[str], reweight: dict) -> torch.Tensor:
    """(T, 77): c at the tokens of each reweighted word in each target, 1 elsewhere. A value may be a list,
    one c per target prompt (several fader positions in one batch)."""
    eq = torch.ones(len(targets), 77)
    for word, c in reweight.items():
        values = list(c) if isinstance(c, (list, tuple)) else [c] * len(targets)
        if len(values) != len(targets):
            raise ValueError(f"reweight {word!r}: {len(values)} values for {len(targets)} target prompts")
        hits = 0
        for b, (t, v) in enumerate(zip(targets, values)):
            try:
                eq[b, tokenizer.word_token_indices(t, word)] = float(v)
                hits += 1
            except ValueError:
                pass
        if not hits:
            raise ValueError(f"reweight word {word!r} is not a word of the prompt{'s' if len(targets) > 1 else ''} "
                             + "; ".join(repr(t) for t in targets)
                             + f" (its words: {', '.join(w for w, _ in tokenizer.word_spans(targets[0]))})")
    return eq


@dataclass
class EditResult:
    settings: EditSettings
    images: list[Image.Image]  # [source, edit 1, ...]
    z_0: torch.Tensor
    controller: Edit


def run_edit(pipe: Pipeline, settings: EditSettings, *, store: AttentionStore | None = None,
             progress: bool = True, inversion: Inversion | None = None) -> EditResult:
    """Algorithm 1: the source and every edit denoised together from the seed's z_T, or, for a real image,
    from an `inversion`'s z_T with its unconditional embeddings (p2p/inversion.py): row 0 is then the
    reconstruction of the image, and the steps, guidance and size default to the inversion's."""
    s = settings if inversion is None else inversion.settle(settings)
    steps = s.steps or pipe.cfg.steps
    ctl = build_controller(s, pipe.tokenizer, steps, store=store, model=pipe.cfg)
    height, width = s.height or pipe.cfg.image_size, s.width or pipe.cfg.image_size
    g = torch.Generator("cpu").manual_seed(s.seed)
    if inversion is None:
        z_T = torch.randn(pipe.latent_shape(height, width), generator=g)
        inputs = {"z_T": z_T, "uncond": pipe.encode_text([s.negative_prompt])}
    else:
        inputs = inversion.sampling_inputs(pipe, s.negative_prompt)
    z_0 = pipe.denoise(cond=pipe.encode_text(s.prompts), steps=steps, eta=s.eta, generator=g, controller=ctl,
                       guidance=pipe.cfg.guidance if s.guidance is None else s.guidance,
                       low_memory=s.low_memory, progress=progress, **inputs)
    return EditResult(s, pipe.decode(z_0), z_0, ctl)


# --- output ------------------------------------------------------------------------------------------

def grid(images: list[Image.Image], captions: list[str] | None = None, rows: int = 1) -> Image.Image:
    """Images side by side (row-major), with a caption band under each when captions are given."""
    w, h = images[0].size
    band = 0 if captions is None else 14 * max(1, max(len(_wrap(c, w)) for c in captions)) + 4
    cols = -(-len(images) // rows)
    out = Image.new("RGB", (cols * w, rows * (h + band)), "white")
    draw = ImageDraw.Draw(out)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + band)
        out.paste(img.convert("RGB"), (x, y))
        if captions is not None:
            for k, line in enumerate(_wrap(captions[i], w)):
                draw.text((x + 2, y + h + 2 + 14 * k), line, fill="black")
    return out


def _wrap(text: str, width: int) -> list[str]:
    per_line = max(1, width // 6)
    words, lines = text.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + 1 + len(word) > per_line:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}".strip()
    return lines


def save_edit(result: EditResult, out_dir: str | Path, extra: dict | None = None) -> list[Path]:
    """0.png (the source), 1.png, ... and grid.png, each carrying the settings that reproduce it."""
    out_dir = Path(out_dir)
    settings = {"command": "edit", **result.settings.to_dict(), **(extra or {})}
    paths = [save_png(img, out_dir / f"{i}.png", {**settings, "index": i}) for i, img in enumerate(result.images)]
    sheet = grid(result.images, result.settings.prompts)
    paths.append(save_png(sheet, out_dir / "grid.png", settings))
    return paths


def sweep(pipe: Pipeline, settings: EditSettings, param: str, values: list, *, progress: bool = True,
          inversion: Inversion | None = None) -> tuple[Image.Image, list[EditResult]]:
    """One edit per value of a parameter; a grid with the source first, then one column per value.

    `param` is an EditSettings field (e.g. cross_replace, self_replace, blend_threshold), "reweight:WORD"
    for the fader value c of a word, or "cross_res" / "self_res" for the sets of resolutions injected.
    """
    results, captions = [], []
    for v in values:
        if param.startswith("reweight:"):
            s = replace(settings, reweight={**settings.reweight, param.split(":", 1)[1]: v})
        elif param in ("cross_res", "self_res"):
            key = param.replace("_res", "_sites")
            s = replace(settings, **{key: replace(getattr(settings, key), res=tuple(v))})
        elif param in {f.name for f in fields(EditSettings)}:
            s = replace(settings, **{param: v})
        else:
            raise ValueError(f"cannot sweep {param!r}: use an edit setting, reweight:WORD, cross_res or self_res")
        results.append(run_edit(pipe, s, progress=progress, inversion=inversion))
        captions.append(f"{param}={v}")
    # one row per edited prompt: the source, then the edit at each value
    cells, caps = [], []
    for b in range(1, len(results[0].images)):
        cells += [results[0].images[0]] + [r.images[b] for r in results]
        caps += ["source"] + captions
    return grid(cells, caps, rows=len(results[0].images) - 1), results

