"""What an edit is, as data: `EditSettings`, its checks, and the controller it builds (Sec. 3.2).

    from p2p import EditSettings, run_edit
    s = EditSettings("a cat riding a bicycle", targets=("a cat riding a car",), mode="replace", seed=8888)
    result = run_edit(pipe, s)          # result.images[0] is the source, [1:] the edits

Defaults are the authors' (cross-attention injection for 80% of the steps, self-attention for 40%
on layers with at most 16 x 16 keys, local blend threshold 0.3 on the 16 x 16 maps), so published
settings reproduce; the resolution-dependent ones follow the model (p2p/core/sites.py). An
`EditSettings` can be read from a TOML file (configs/edits/) and is written into every image.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from models.errors import UserError, read_toml
from models.presets import PRESETS, ModelConfig

from .align import refine_mappers, replace_mappers, word_occurrences
from .attention_edit import AttentionEdit, Refine, Replace, Reweight, cross_schedule
from .controller import Compose, as_window
from .local_blend import LocalBlend
from .sites import SiteSelection, p2p_defaults

MODES = ("replace", "refine", "reweight")
SITE_FIELDS = ("cross_sites", "self_sites", "blend_sites")


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
    cross_sites: SiteSelection = SiteSelection()  # where cross-attention is injected (ablations)
    self_sites: SiteSelection | None = None  # where self-attention is injected (None: the model's, SD v1 max_res 16)
    blend_sites: SiteSelection | None = None  # maps the blend mask is made from (None: the model's, SD v1 res 16)
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
        """[P, P*_1, ...]. One target with several fader values c (reweight={"snowy": [-1, 1, 3]}) is
        repeated, one column per value; mode "reweight" edits the prompt itself."""
        targets = self.targets or ((self.prompt,) if self.mode == "reweight" else ())
        columns = max((len(v) for v in self.reweight.values() if isinstance(v, (list, tuple))), default=1)
        if len(targets) == 1 and columns > 1:
            targets = targets * columns
        return [self.prompt, *targets]

    def resolved(self, model: ModelConfig) -> EditSettings:
        """The settings with every None filled in from the model's defaults (what an image records)."""
        d = p2p_defaults(model)
        return replace(self, steps=self.steps or model.steps,
                       guidance=model.guidance if self.guidance is None else self.guidance,
                       height=self.height or model.image_size, width=self.width or model.image_size,
                       self_sites=self.self_sites or d.self_sites, blend_sites=self.blend_sites or d.blend_sites)

    def with_sites(self, kind: str, model: ModelConfig | None, **changes) -> EditSettings:
        """The settings with `{kind}_sites` (cross, self or blend) changed, starting from the model's default
        selection when it is unset (from every site when `model` is None: only the values are checked then)."""
        key = f"{kind}_sites"
        current = getattr(self, key)
        if current is None:
            current = SiteSelection() if model is None else getattr(p2p_defaults(model), key)
        return replace(self, **{key: replace(current, **changes)})

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, SiteSelection) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> EditSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise UserError(f"unknown edit settings: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
        d = dict(d)
        for k in SITE_FIELDS:
            if isinstance(d.get(k), dict):
                try:
                    d[k] = SiteSelection.from_dict(d[k])
                except TypeError as e:
                    raise UserError(f"{k}: {e}; its fields are kinds, places, res, blocks, max_res") from None
        for k in ("targets", "blend", "blend_subtract", "self_replace"):
            if isinstance(d.get(k), list):
                d[k] = tuple(tuple(x) if isinstance(x, list) else x for x in d[k])
        if isinstance(d.get("cross_replace"), list):
            d["cross_replace"] = tuple(d["cross_replace"])
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> EditSettings:
        data = read_toml(path, "edit settings file")
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: {e}") from None


def check(settings: EditSettings, tokenizer) -> None:
    """Raise a ValueError naming the problem for settings that cannot make a meaningful edit."""
    s = settings
    if s.mode not in MODES:
        raise UserError(f"unknown edit mode {s.mode!r}; use one of {', '.join(MODES)}")
    if s.mode != "reweight" and not s.targets:
        raise UserError(f"mode {s.mode!r} needs at least one target prompt")
    if s.mode == "reweight":
        if not s.reweight:
            raise UserError("mode 'reweight' needs words to reweight, e.g. reweight={'snowy': 2.0}")
        if any(t != s.prompt for t in s.targets):
            raise UserError("mode 'reweight' edits the prompt itself (targets equal to the prompt); to reweight "
                            "words of a changed prompt, use mode 'replace' or 'refine' with reweight=...")
    check_windows(s)
    for p in s.prompts:
        n = tokenizer.count(p)
        if n > 77:
            raise UserError(f"the prompt {p!r} is {n} tokens, more than the 77 the text encoder takes; "
                            "shorten it (an edit aligns tokens, so it cannot run on a truncated prompt)")


def check_windows(settings: EditSettings) -> None:
    """Raise a ValueError naming the setting if an injection window is not a fraction or (start, end) in [0, 1]."""
    as_window(settings.self_replace, "self_replace")
    cross = settings.cross_replace
    for v in (cross.values() if isinstance(cross, dict) else [cross]):
        as_window(v, "cross_replace")


def build_controller(settings: EditSettings, tokenizer, steps: int, model: ModelConfig = PRESETS["sd-v1"]):
    """The controller of the settings for a sampler of `steps` steps: the `AttentionEdit`, followed by the
    `LocalBlend` when blend words are given (it reads the edited maps). `model` gives the defaults that
    depend on the network's resolutions."""
    check(settings, tokenizer)
    s, prompts = settings, settings.prompts
    defaults = p2p_defaults(model)
    source, targets = prompts[0], prompts[1:]
    function = None
    if s.mode == "replace":
        function = Replace(replace_mappers(tokenizer, source, targets))
    elif s.mode == "refine":
        function = Refine(*refine_mappers(tokenizer, source, targets))
    if s.reweight:
        function = Reweight(equalizer(tokenizer, targets, s.reweight), previous=function)
    edit = AttentionEdit(function, cross_schedule(tokenizer, prompts, steps, s.cross_replace), s.self_replace,
                         cross_sites=s.cross_sites, self_sites=s.self_sites or defaults.self_sites)
    if not s.blend:
        return edit
    blend = LocalBlend(tokenizer, prompts, list(s.blend), subtract=list(s.blend_subtract),
                       threshold=s.blend_threshold, start=s.blend_start, sites=s.blend_sites or defaults.blend_sites)
    return Compose(edit, blend)


def equalizer(tokenizer, targets: list[str], reweight: dict) -> torch.Tensor:
    """(T, 77): c at the tokens of each reweighted word in each target, 1 elsewhere. A value may be a list,
    one c per target prompt (several fader positions in one batch)."""
    eq = torch.ones(len(targets), 77)
    for word, c in reweight.items():
        values = list(c) if isinstance(c, (list, tuple)) else [c] * len(targets)
        if len(values) != len(targets):
            raise UserError(f"reweight {word!r}: {len(values)} values for {len(targets)} target prompts")
        for b, tokens in word_occurrences(tokenizer, targets, word, "reweight"):
            eq[b, tokens] = float(values[b])
    return eq
