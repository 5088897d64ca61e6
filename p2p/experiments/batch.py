"""Several edits in one sampling run: jobs packed into one batch, each with its own controller on its rows.

An edit is a batch [source, target 1, ...] from one z_T, its controller editing the target rows from the
source row (p2p/core/run.py). Jobs that share the steps, guidance and size can share the UNet calls: their
rows are stacked, [source A, targets of job 1, targets of job 2 (also on A), source B, targets of job 3, ...]
(a source row is shared by every job of the same prompt, seed and negative prompt), each row starts from
its own seed's z_T and its own unconditional embedding, and `Packed` runs each job's controller on its
rows only, as if its rows were the whole batch. The source row is never edited (the edit functions
return it unchanged and local blend keeps it), so sharing it changes nothing for the jobs.

A job alone in its batch runs through `run_edit` itself, exactly as `p2p edit`; a job that is not an edit
always runs alone (`run_alone`): a generation through `Pipeline.generate`, a round trip through the VAE.

How many prompts go in one batch: at most `--batch-size`, and with `--max-memory` at most as many as the
budget holds by `row_bytes`, an estimate of the activation memory of one prompt worked out from the model's
configuration (no measurement: the same on every device and rank, so the packing is too).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.errors import UserError
from models.tokenizer import MAX_LENGTH

from p2p.core.controller import Compose, Controller, GuidanceLayout
from p2p.core.run import EditResult, run_edit
from p2p.core.settings import EditSettings, build_controller
from p2p.core.sites import SiteSelection

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


TRANSIENT = 16  # feature maps of the widest level alive at once in a transformer block (norms, Q K V, GEGLU's 8x)


def row_bytes(pipe, s: EditSettings, maps: SiteSelection | None = None) -> int:
    """Estimated activation memory (bytes) of one prompt (row) of a batch of the resolved settings `s`, for
    `--max-memory`. The prompt is 2 UNet rows (classifier-free guidance in one call; 1 with low_memory or
    guidance <= 1), each holding, in the model's dtype:

    - the skip connections of the down path: layers_per_block + 1 feature maps per level, ch_l x h_l x w_l
      values each (the latent's h x w, halved per level);
    - the transient of a transformer block at the first level: TRANSIENT x ch_0 x h_0 x w_0 values;
    - the largest attention map the job's controller reads, heads x queries x keys at the sites its edit
      (cross_sites, self_sites, the blend's), the measures' store (`maps`) select: Q K^T, its float32
      softmax and the edited copy, 3 x dtype + 2 x 4 bytes per value. Everywhere else attention runs through
      scaled_dot_product_attention, which keeps no map.

    Weights, text encoding and decoding (one image at a time) are outside it. It is a bound of the right size,
    not a measurement: a batch of n prompts is estimated at n x the largest row_bytes of its jobs."""
    cfg = pipe.cfg.unet
    size = torch.finfo(pipe.dtype).bits // 8
    h, w = s.height // pipe.cfg.vae_scale, s.width // pipe.cfg.vae_scale
    grids = [(max(h >> level, 1), max(w >> level, 1)) for level in range(len(cfg.block_out_channels))]
    skips = sum((cfg.layers_per_block + 1) * ch * gh * gw for ch, (gh, gw) in zip(cfg.block_out_channels, grids))
    transient = TRANSIENT * cfg.block_out_channels[0] * grids[0][0] * grids[0][1]
    wanted = [(maps, ("cross", "self")), (s.blend_sites if s.blend else None, ("cross",))]  # (selection, kinds)
    if s.targets or s.mode == "reweight":  # an edit: the maps it injects or reweights
        wanted += [(s.cross_sites, ("cross",)), (s.self_sites, ("self",))]
    biggest = 0
    for site in pipe.unet.sites:
        hw = grids[min(site.level, len(grids) - 1)]
        if any(sel is not None and site.kind in kinds and sel.selects(site, hw) for sel, kinds in wanted):
            keys = hw[0] * hw[1] if site.kind == "self" else MAX_LENGTH
            biggest = max(biggest, cfg.heads_at(site.level) * hw[0] * hw[1] * keys)
    guided = 1 if s.low_memory or s.guidance <= 1 else 2
    return guided * ((skips + transient) * size + biggest * (3 * size + 8))


def batch_bytes(pipe, settings: list[EditSettings], maps: SiteSelection | None = None) -> int:
    """The estimate for a packed batch of these jobs: its rows (`layout`) x the largest row_bytes."""
    return len(layout(settings)[0]) * max(row_bytes(pipe, s, maps) for s in settings)


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


def run_alone(pipe, job: Job, store: Controller | None, progress: bool = False) -> Outcome:
    """One job in a batch of its own: an edit (`run_edit`), a generation of its prompts from one seed's z_T (the
    store, if any, is its only controller), or the VAE round trip of its scene ([rendering, D(E(rendering))]).
    A generation or a round trip has no controller and no z_0 in its result."""
    s = job.settings
    if job.kind == "edit":
        return Outcome(job, run_edit(pipe, s, controller=store, progress=progress), store)
    if job.kind == "generate":
        images = pipe.generate(s.prompts, seed=s.seed, steps=s.steps, guidance=s.guidance, height=s.height,
                               width=s.width, eta=s.eta, negative_prompt=s.negative_prompt, controller=store,
                               low_memory=s.low_memory, progress=progress)
        return Outcome(job, EditResult(s, images, None, None), store)
    from p2p.files.images import encode_image
    from p2p.world import evaluate, scenes

    image, _ = scenes.render(evaluate.scene_from_table(job.scene))
    return Outcome(job, EditResult(s, [image, *pipe.decode(encode_image(pipe, image))], None, None), None)


def run_edits(pipe, settings: list[EditSettings], *, controllers: list[Controller | None] | None = None,
              progress: bool = False) -> list[EditResult]:
    """Several edits in one sampling run: their rows packed into one batch (module docstring), each edit's
    controller on its own rows, so that the UNet's calls are shared; the images are those of `run_edit` on each
    alone, up to float rounding of the larger batch (at most 2/255 on a pixel, tests/test_experiments.py; 16 swaps
    and their baselines on the embedded model took 0.7x the time they take one by one on a 2-core CPU). The edits must
    share the steps, guidance and size, with eta 0; `controllers[i]` (or None) runs after edit i's and sees its
    edited maps, as in `run_edit`."""
    settings = [s.resolved(pipe.cfg) for s in settings]
    if not settings:
        return []
    s0 = settings[0]
    for name in ("steps", "guidance", "height", "width", "low_memory"):
        values = sorted({str(getattr(s, name)) for s in settings})
        if len(values) > 1:
            raise UserError(f"run_edits packs edits of one sampling setup, but they differ in {name} "
                            f"({', '.join(values)}): give them one {name}, or run them with run_edit one by one")
    if any(s.eta for s in settings):
        raise UserError("run_edits packs deterministic DDIM edits (eta 0): run an edit with eta > 0 with run_edit")
    controllers = controllers or [None] * len(settings)
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
    packed = Packed([(rows, Compose(e, c)) for rows, e, c in zip(groups, edits, controllers)])
    z_0 = pipe.denoise(z_T, pipe.encode_text(prompts), uncond, steps=s0.steps, guidance=s0.guidance,
                       controller=packed, low_memory=s0.low_memory, progress=progress)
    images = pipe.decode(z_0)
    return [EditResult(s, [images[r] for r in rows], z_0[rows], edit)
            for s, rows, edit in zip(settings, groups, edits)]


def run_unit(pipe, jobs: list[Job], stores: list[Controller | None], progress: bool = False) -> list[Outcome]:
    """Run jobs of one sampling setup (same steps, guidance, size, eta 0) in one batch (`run_edits`);
    `stores[i]` (or None) is composed after job i's edit and sees its edited maps."""
    if len(jobs) == 1:
        return [run_alone(pipe, jobs[0], stores[0], progress)]
    results = run_edits(pipe, [j.settings for j in jobs], controllers=stores, progress=progress)
    return [Outcome(job, result, store) for job, result, store in zip(jobs, results, stores)]
