"""Several edits in one sampling run: jobs packed into one batch, each with its own controller on its rows.

An edit is a batch [source, target 1, ...] from one z_T, its controller editing the target rows from the
source row (p2p/core/run.py). Jobs that share the steps, guidance and size can share the UNet calls: their
rows are stacked, [source A, targets of job 1, targets of job 2 (also on A), source B, targets of job 3, ...]
(a source row is shared by every job of the same prompt, seed and negative prompt), each row starts from
its own seed's z_T and its own unconditional embedding, and `Packed` runs each job's controller on its
rows only, as if its rows were the whole batch. The source row is never edited (the edit functions
return it unchanged and local blend keeps it), so sharing it changes nothing for the jobs.

A job alone in its batch runs through `run_edit` itself, exactly as `p2p edit`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from p2p.core.controller import Compose, Controller, GuidanceLayout
from p2p.core.run import EditResult, run_edit
from p2p.core.settings import EditSettings, build_controller

from .spec import Job


class Packed(Controller):
    """Controllers of several edits in one batch: group g owns the rows `rows[g]` of the prompts (its source
    first) and sees them as its whole batch. Only a group's target rows are written back: a source row may
    be shared by several groups and stays the plain generation of its prompt."""

    def __init__(self, groups: list[tuple[list[int], Controller]]):
        self.groups = [(torch.tensor(rows), c) for rows, c in groups]

    def begin_sampling(self, num_steps):
        super().begin_sampling(num_steps)
        for _, c in self.groups:
            c.begin_sampling(num_steps)

    def begin_step(self, step, t, layout):
        super().begin_step(step, t, layout)
        for rows, c in self.groups:
            n = len(rows)  # the group's rows, seen alone: cond (or uncond) rows 0..n
            c.begin_step(step, t, GuidanceLayout(n, None if layout.cond is not None else slice(0, n),
                                                 slice(0, n) if layout.cond is not None else None))

    def wants_map(self, site, hw):
        return self.layout.cond is not None and any(c.wants_map(site, hw) for _, c in self.groups)

    def on_map(self, M, site, hw):
        cond = self.layout.cond
        C, out = M[cond], None
        for rows, c in self.groups:
            if not c.wants_map(site, hw):
                continue
            given = C[rows.to(C.device)]
            new = c.on_map(given, site, hw)
            if new is given:  # read only
                continue
            out = C.clone() if out is None else out
            out[rows[1:].to(C.device)] = new[1:]
        if out is None:
            return M
        return torch.cat([M[:cond.start], out, M[cond.stop:]])

    def end_step(self, step, z_t):
        out = None
        for rows, c in self.groups:
            given = z_t[rows.to(z_t.device)]
            new = c.end_step(step, given)
            if new is given:
                continue
            out = z_t.clone() if out is None else out
            out[rows[1:].to(z_t.device)] = new[1:]
        return z_t if out is None else out


@dataclass
class Outcome:
    """One job's result: the edit (images, z_0, its controller) and the store of its maps (or None)."""

    job: Job
    result: EditResult
    store: Controller | None


def layout(settings: list[EditSettings]) -> tuple[list[str], list[EditSettings], list[list[int]]]:
    """Rows of a packed batch: (prompt per row, the settings whose seed and negative prompt each row takes,
    the rows of each job, its source first). Jobs with the same source share its row."""
    prompts, owners, groups, sources = [], [], [], {}
    for s in settings:
        key = (s.prompt, s.seed, s.negative_prompt)
        if key not in sources:
            sources[key] = len(prompts)
            prompts.append(s.prompt)
            owners.append(s)
        rows = [sources[key]]
        for p in s.prompts[1:]:
            rows.append(len(prompts))
            prompts.append(p)
            owners.append(s)
        groups.append(rows)
    return prompts, owners, groups


def run_unit(pipe, jobs: list[Job], stores: list[Controller | None], progress: bool = False) -> list[Outcome]:
    """Run jobs of one sampling setup (same steps, guidance, size, eta 0) in one batch; `stores[i]` (or None)
    is composed after job i's edit and sees its edited maps."""
    if len(jobs) == 1:
        r = run_edit(pipe, jobs[0].settings, controller=stores[0], progress=progress)
        return [Outcome(jobs[0], r, stores[0])]
    settings = [j.settings for j in jobs]
    s0 = settings[0]
    prompts, owners, groups = layout(settings)
    latents, unconds = {}, {}
    for s in owners:
        if s.seed not in latents:
            latents[s.seed] = pipe.initial_latent(s.seed, s0.height, s0.width)
        if s.negative_prompt not in unconds:
            unconds[s.negative_prompt] = pipe.encode_text([s.negative_prompt])
    z_T = torch.cat([latents[s.seed] for s in owners])
    uncond = torch.cat([unconds[s.negative_prompt] for s in owners])
    edits = [build_controller(s, pipe.tokenizer, s.steps, model=pipe.cfg) for s in settings]
    packed = Packed([(rows, Compose(e, st)) for rows, e, st in zip(groups, edits, stores)])
    z_0 = pipe.denoise(z_T, pipe.encode_text(prompts), uncond, steps=s0.steps, guidance=s0.guidance,
                       controller=packed, low_memory=s0.low_memory, progress=progress)
    images = pipe.decode(z_0)
    return [Outcome(job, EditResult(job.settings, [images[r] for r in rows], z_0[rows], edit), store)
            for job, rows, edit, store in zip(jobs, groups, edits, stores)]
