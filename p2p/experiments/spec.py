"""An experiment file: a model, shared edit settings, a list of jobs and/or a grid, and the measurements.

    description = "cross_replace x self_replace on one word swap"
    model = "embedded"                       # a diffusers folder, a single file (+ tokenizer = ...), or embedded
    measures = ["psnr_outside", "attention"] # see p2p/experiments/measures.py

    [settings]                               # every job starts from these: any EditSettings field
    prompt = "a big red square on a green background"
    targets = ["a big blue square on a green background"]
    steps = 20

    [grid]                                   # the product of the lists, in this order
    cross_replace = [0.2, [0.0, 0.4], 0.8]   # a field of EditSettings: a list of its values (windows too)
    self_sites = [{ max_res = 8 }, { max_res = 4 }]   # *_sites: site selections as tables
    seed = [0, 1]
    swap = [{ label = "colour", targets = ["a big blue square on a green background"] },
            { label = "shape", targets = ["a big red circle on a green background"] }]
                                             # any other name: a list of tables of settings that vary together

    [[jobs]]                                 # optional: explicit jobs, each one crossed with the grid
    prompt = "..."
    kind = "generate"                        # optional, any table: what the job runs (KINDS), default "edit"

A job is an edit (`kind = "edit"`, the default: `run_edit` of its settings), a generation (`kind =
"generate"`: its prompt and targets from one seed's z_T with no control, e.g. the baseline of an edit, or
plain generation without targets) or the VAE round trip of a rendered scene of the scene generator
(`kind = "vae"`, with `scene = { background, bg_kind, bg_seed, things = [...] }`, as
p2p.world.evaluate.scene_table writes it; its prompt defaults to the scene's caption). `p2p eval`'s
measures need all three (p2p.world.evaluate.experiment_text).

Everything here is checked before any model loads (`read_experiment`): unknown keys, values out of range,
words of blend / reweight / cross_replace that are in none of the job's prompts, and the number of jobs
(more than MAX_JOBS needs `yes=True`, `p2p run --yes`). `expand` then gives the jobs in a fixed order;
their ids (`job_id`) hash the settings resolved against the model and the model's fingerprint, so the
same job has the same id in every run, whatever its place in the file.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from models.errors import UserError, read_toml

from p2p.core.controller import as_window
from p2p.core.settings import MODES, SITE_FIELDS, EditSettings

MAX_JOBS = 10_000  # more needs --yes
TOP_KEYS = ("description", "model", "tokenizer", "measures", "settings", "grid", "jobs")
FIELDS = {f.name for f in fields(EditSettings)}
KINDS = ("edit", "generate", "vae")
JOB_KEYS = ("kind", "scene")  # what a job is, next to its settings (not fields of EditSettings)
NUMBERS = ("steps", "height", "width", "guidance", "eta", "seed", "blend_threshold", "blend_start")


@dataclass(frozen=True)
class Experiment:
    """A parsed, checked experiment file. `points` are the jobs' settings as dicts, in the file's order,
    each with the labels of its grid axes (`axes`)."""

    path: str
    description: str
    model: str
    tokenizer: str | None
    measures: tuple[str, ...]
    axes: tuple[str, ...]  # grid axes in order ("job" first when the file lists [[jobs]])
    points: tuple[tuple[dict, dict], ...]  # (settings dict, {axis: label}) per job

    def settings(self) -> list[EditSettings]:
        return [EditSettings.from_dict(settings_part(d)) for d, _ in self.points]


@dataclass(frozen=True)
class Job:
    """One edit of an experiment: its id, its settings resolved against the model, its grid labels."""

    id: str
    index: int  # place in the experiment's order
    settings: EditSettings  # resolved: every default filled in from the model
    axes: dict  # axis -> label
    kind: str = "edit"  # one of KINDS
    scene: dict | None = None  # the scene of a "vae" job, as a table


def settings_part(d: dict) -> dict:
    """A job's dict without the JOB_KEYS: its EditSettings fields."""
    return {k: v for k, v in d.items() if k not in JOB_KEYS}


def label(value) -> str:
    """A grid value as a short text: 0.4, "0-0.4" for a window, "res=16" for a site selection."""
    if isinstance(value, dict):
        if "label" in value:
            return str(value["label"])
        return " ".join(f"{k}={label(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "-".join(label(v) for v in value) if all(isinstance(v, (int, float)) for v in value) \
            else ",".join(label(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def unlabelled(value):
    """A table without its "label" (the name shown for it in the tables); any other value as it is."""
    return {k: v for k, v in value.items() if k != "label"} if isinstance(value, dict) else value


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


def _in_prompt(word: str, prompt: str) -> bool:
    """Whether `word` (a word or a phrase) occurs as whole words in the prompt (case-insensitive)."""
    want, have = _words(word), _words(prompt)
    return bool(want) and any(have[i:i + len(want)] == want for i in range(len(have) - len(want) + 1))


def did_you_mean(name: str, options) -> str:
    """" (did you mean 'steps'?)" for a close option, else ""."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_point(d: dict, where: str) -> None:
    """Checks of one job's settings that need no model: fields, kind and scene, numbers, mode, windows, words."""
    unknown = sorted(set(d) - FIELDS - set(JOB_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown setting {unknown[0]!r}{did_you_mean(unknown[0], FIELDS)}; the settings are "
                        f"the fields of EditSettings: {', '.join(sorted(FIELDS))} (and a job's {' and '.join(JOB_KEYS)})")
    kind = d.get("kind", "edit")
    if kind not in KINDS:
        raise UserError(f"{where}: unknown kind {kind!r}; a job is one of {', '.join(KINDS)}")
    if (kind == "vae") != ("scene" in d):
        raise UserError(f"{where}: " + ("a kind = 'vae' job needs scene = { ... }, the scene to render" if kind == "vae"
                                         else "scene is for a kind = 'vae' job only"))
    if kind == "vae":
        from p2p.world.evaluate import scene_from_table

        try:
            scene_from_table(d["scene"]) if isinstance(d["scene"], dict) else scene_from_table({})
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
    d = settings_part(d)
    if "prompt" not in d:
        raise UserError(f"{where}: no prompt; set prompt in [settings], in a [[jobs]] entry or on a grid axis")
    from p2p.cli.args import rule_message

    for name in ("prompt", "negative_prompt"):
        if name in d and not isinstance(d[name], str):
            raise UserError(f"{where}: {name} must be a string, got {d[name]!r}")
    for name in ("targets", "blend", "blend_subtract"):
        if name in d and not isinstance(d[name], list):
            raise UserError(f"{where}: {name} must be a list, e.g. {name} = [\"...\"], got {d[name]!r}")

    for name in NUMBERS:
        if d.get(name) is not None and (problem := rule_message(name, d[name])):
            raise UserError(f"{where}: {name} {problem}")
    try:
        s = EditSettings.from_dict(d)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None
    if kind != "edit":  # no controller: the edit's settings are not used
        return
    if s.mode not in MODES:
        raise UserError(f"{where}: unknown mode {s.mode!r}; use one of {', '.join(MODES)}")
    if s.mode != "reweight" and not s.targets:
        raise UserError(f"{where}: mode {s.mode!r} needs targets (the edited prompts)")
    if s.mode == "reweight" and not s.reweight:
        raise UserError(f"{where}: mode 'reweight' needs reweight = {{ WORD = C }}")
    try:
        as_window(s.self_replace, "self_replace")
        for v in (s.cross_replace.values() if isinstance(s.cross_replace, dict) else [s.cross_replace]):
            as_window(v, "cross_replace")
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    prompts = s.prompts
    if s.mode == "replace" and any(len(p.split()) != len(s.prompt.split()) for p in prompts):
        raise UserError(f"{where}: a word swap (mode 'replace') needs targets with as many words as the prompt "
                        f"{s.prompt!r}; use mode = 'refine' to add words")
    targets = prompts[1:]  # the edit functions look for cross_replace and reweight words in the targets
    words = [("blend", w, prompts) for w in s.blend] + [("blend_subtract", w, prompts) for w in s.blend_subtract]
    words += [("reweight", w, targets) for w in s.reweight]
    if isinstance(s.cross_replace, dict):
        words += [("cross_replace", w, targets) for w in s.cross_replace if w != "default_"]
    for what, w, among in words:
        for word in (w if isinstance(w, (list, tuple)) else [w]):  # blend may list words per prompt
            if isinstance(word, str) and not any(_in_prompt(word, p) for p in among):
                raise UserError(f"{where}: {what} word {word!r} is in none of the "
                                f"{'prompts' if among is prompts else 'targets'} " + "; ".join(map(repr, among))
                                + ": use a word of them or fix the prompt")


def read_experiment(path: str | Path, *, yes: bool = False, known_measures=()) -> Experiment:
    """Parse and check an experiment file (no model is loaded); a UserError names any problem."""
    data = read_toml(path, "experiment file")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], TOP_KEYS + tuple(FIELDS), n=1)
        hint = " (edit settings go in [settings])" if unknown[0] in FIELDS else \
            f" (did you mean {close[0]!r}{' in [settings]' if close[0] in FIELDS else ''}?)" if close else ""
        raise UserError(f"{path}: unknown key {unknown[0]!r}{hint}; an experiment file has {', '.join(TOP_KEYS)}")
    measures = data.get("measures", [])
    if not isinstance(measures, list) or not all(isinstance(m, str) for m in measures):
        raise UserError(f"{path}: measures must be a list of names, e.g. [\"psnr_outside\"]")
    for m in measures:
        if known_measures and m not in known_measures:
            raise UserError(f"{path}: unknown measure {m!r}; known: {', '.join(known_measures)}")
    shared = data.get("settings", {})
    grid = data.get("grid", {})
    jobs = data.get("jobs", [{}])
    for name, table in (("settings", shared), ("grid", grid)):
        if not isinstance(table, dict):
            raise UserError(f"{path}: {name} must be a table ([{name}])")
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise UserError(f"{path}: jobs must be a non-empty array of tables ([[jobs]])")
    axes = []  # (name, [(settings changes, label)])
    if "jobs" in data:
        axes.append(("job", [(unlabelled(j), label(j.get("label", i))) for i, j in enumerate(jobs)]))
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{path}: grid.{name} must be a non-empty list of values, e.g. {name} = [0.2, 0.4]")
        if name in FIELDS or name in JOB_KEYS:
            if name in SITE_FIELDS and not all(isinstance(v, dict) for v in values):
                raise UserError(f"{path}: grid.{name} lists site selections as tables, e.g. [{{ res = [16] }}]")
            axes.append((name, [({name: unlabelled(v)}, label(v)) for v in values]))
        elif all(isinstance(v, dict) for v in values):
            axes.append((name, [(unlabelled(v), label(v)) for v in values]))
        else:
            raise UserError(f"{path}: unknown setting {name!r} in [grid]{did_you_mean(name, FIELDS)}; a grid axis "
                            f"is a field of EditSettings ({', '.join(sorted(FIELDS))}) or a named list of tables of "
                            "settings")
    count = math.prod(len(values) for _, values in axes)
    if count > MAX_JOBS and not yes:
        raise UserError(f"{path}: the grid makes {count:,} jobs (more than {MAX_JOBS:,}); shrink it, or pass --yes "
                        "to run them all")
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        d = dict(shared)
        for changes, _ in combo:
            d.update(changes)
        points.append((d, {name: lab for (name, _), (_, lab) in zip(axes, combo)}))
    for d, _ in points:  # a round trip's prompt: its scene's caption
        if d.get("kind") == "vae" and "prompt" not in d and isinstance(d.get("scene"), dict):
            from p2p.world import evaluate, scenes

            try:
                d["prompt"] = scenes.caption(evaluate.scene_from_table(d["scene"]))
            except ValueError:
                pass  # check_point names the problem
    checked = set()
    for d, labels in points:  # checking one job per distinct settings keeps a large grid fast
        key = json.dumps(d, sort_keys=True, default=str)
        if key not in checked:
            checked.add(key)
            check_point(d, f"{path} ({', '.join(f'{k}={v}' for k, v in labels.items())})" if labels else str(path))
    model = data.get("model", "embedded")
    if not isinstance(model, str):
        raise UserError(f"{path}: model must be a path (a string) or \"embedded\"")
    return Experiment(str(path), str(data.get("description", "")), model, data.get("tokenizer"),
                      tuple(measures), tuple(name for name, _ in axes), tuple(points))


def job_id(settings: EditSettings, fingerprint: str, measures: tuple[str, ...], kind: str = "edit",
           scene: dict | None = None) -> str:
    """16 hex digits of sha256 over the resolved settings, the model fingerprint and the measures asked for (and
    the kind and scene of a job that is not an edit)."""
    what = {"settings": settings.to_dict(), "model": fingerprint, "measures": sorted(measures)}
    if kind != "edit":
        what.update(kind=kind, scene=scene)
    text = json.dumps(what, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand(experiment: Experiment, model_cfg, fingerprint: str) -> list[Job]:
    """The experiment's jobs in order, resolved against the model; a job listed twice is kept once."""
    jobs, seen = [], set()
    for (d, labels), s in zip(experiment.points, experiment.settings()):
        s = s.resolved(model_cfg)
        kind, scene = d.get("kind", "edit"), d.get("scene")
        jid = job_id(s, fingerprint, experiment.measures, kind, scene)
        if jid not in seen:
            seen.add(jid)
            jobs.append(Job(jid, len(jobs), s, labels, kind, scene))
    return jobs


def pack(jobs: list[Job], batch_size: int, max_memory: int | None = None,
         row_bytes: Callable[[EditSettings], int] | None = None) -> list[list[Job]]:
    """Jobs in batches of at most `batch_size` prompts (rows), each batch of one sampling setup (steps,
    guidance, size, eta 0, low_memory): consecutive jobs of the same setup go together, in order, so the
    packing depends only on the job list. A job with eta > 0 draws its own noise and runs alone, as does a job
    that is not an edit (a generation, a round trip). With
    `max_memory` (bytes), a batch also keeps its rows x the largest `row_bytes(settings)` of its jobs (an
    estimate per prompt, batch.row_bytes) within it: the smaller of the two limits holds. A job whose own rows
    exceed a limit runs alone."""
    def setup(s: EditSettings):
        return (s.steps, s.guidance, s.height, s.width, s.low_memory) if s.eta == 0 else None

    units, current, rows, peak = [], [], 0, 0
    for job in jobs:
        s = job.settings
        alone = job.kind != "edit" or (current and current[0].kind != "edit")
        add = len(s.prompts) - any(same_source(s, j.settings) for j in current)  # a shared source row counts once
        each = row_bytes(s) if max_memory is not None else 0
        fits = rows + add <= batch_size and (max_memory is None or (rows + add) * max(peak, each) <= max_memory)
        if current and not alone and setup(s) is not None and setup(s) == setup(current[0].settings) and fits:
            current.append(job)
            rows, peak = rows + add, max(peak, each)
        else:
            if current:
                units.append(current)
            current, rows, peak = [job], len(s.prompts), each
    if current:
        units.append(current)
    return units


def same_source(a: EditSettings, b: EditSettings) -> bool:
    """Whether two jobs have the same source row: prompt, seed and negative prompt (with one setup)."""
    return (a.prompt, a.seed, a.negative_prompt) == (b.prompt, b.seed, b.negative_prompt)

