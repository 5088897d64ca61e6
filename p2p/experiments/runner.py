"""Running an experiment: resumable, one folder per job, a results table written whole.

    DIR/jobs/<id>/0.png 1.png ... grid.png    the images, each with its settings in the PNG metadata
    DIR/jobs/<id>/row.json                    the job's row: id, settings, seed, model, measures, timing
    DIR/results.jsonl                         the rows of the experiment's jobs, in its order
    DIR/summary.md, DIR/index.html            tables of the measures, a contact sheet (report.py)
    DIR/experiment.toml                       the experiment file the tables were made from

A job's folder is written in a temporary sibling and renamed when complete (`staged_folder`), row.json
included, so a job is done exactly when its folder exists. A rerun skips the jobs whose folders exist and
runs the others; a changed file changes the ids of the changed jobs only (`spec.job_id`), so only they
run. A killed run leaves at most the temporary folders of the jobs in flight, removed by the next run;
the tables are rewritten whole (temporary file, then rename) at the end by rank 0, from the job folders.
Folders of jobs no longer in the file stay in jobs/ but are left out of the tables.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from models.errors import UserError

from p2p.core.run import save_edit
from p2p.core.settings import build_controller
from p2p.files.output import grid, save_image, staged_folder

from .batch import row_bytes, run_unit
from .dist import Ranks
from .measures import measure, store_for, store_sites
from .spec import Experiment, Job, expand, pack


@dataclass
class RunStats:
    jobs: int  # in the experiment (distinct)
    done_before: int  # found finished
    ran: int  # by this process
    seconds: float
    out_dir: Path


def model_fingerprint(pipe) -> str:
    """16 hex digits of sha256 over the model's family, dtype and a few weight tensors (the UNet's first and last
    convolutions, the text encoder's first weights, the VAE's last), read on the CPU so every device agrees."""
    h = hashlib.sha256(f"{pipe.cfg.family} {pipe.dtype}".encode())
    tensors = [pipe.unet.conv_in.weight, pipe.unet.conv_out.weight, next(pipe.text_encoder.parameters()),
               list(pipe.vae.parameters())[-1]]
    for w in tensors:
        h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_jobs(pipe, jobs: list[Job]) -> None:
    """The checks that need the tokenizer and the model's size rules, on every job, before any runs."""
    seen = set()
    for job in jobs:
        s = job.settings
        key = json.dumps(s.to_dict(), sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            if job.kind == "edit":
                build_controller(s, pipe.tokenizer, s.steps, model=pipe.cfg)  # every check of the words and values
            if job.kind != "vae":
                pipe.latent_shape(s.height, s.width)
        except UserError as e:
            where = ", ".join(f"{k}={v}" for k, v in job.axes.items())
            raise UserError(f"job {job.index}{f' ({where})' if where else ''}: {e}") from None


def clean(value):
    """JSON-safe: NaN and infinities become None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def save_images(o, folder: Path, extra: dict) -> None:
    """0.png, 1.png, ... and grid.png of a job, each with its settings (`save_edit` for an edit)."""
    if o.job.kind == "edit":
        save_edit(o.result, folder, extra)
        return
    s = o.result.settings
    meta = {"command": o.job.kind, **s.to_dict(), **({"scene": o.job.scene} if o.job.scene else {}), **extra}
    for i, img in enumerate(o.result.images):
        save_image(img, folder / f"{i}.png", {**meta, "index": i})
    captions = s.prompts if o.job.kind == "generate" else [f"{s.prompt} (rendered)", "VAE round trip"]
    save_image(grid(o.result.images, captions), folder / "grid.png", meta)


def write_text(path: Path, text: str) -> None:
    """Write a file whole: a temporary name in the same folder, renamed when written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale(jobs_dir: Path) -> None:
    """Temporary folders of jobs a killed run had in flight."""
    for p in jobs_dir.glob(".*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def read_rows(out_dir: Path, jobs: list[Job]) -> list[dict]:
    """The rows of the finished jobs, in the experiment's order."""
    rows = []
    for job in jobs:
        path = out_dir / "jobs" / job.id / "row.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


def write_tables(out_dir: Path, experiment: Experiment, jobs: list[Job]) -> list[dict]:
    """results.jsonl, summary.md, index.html and experiment.toml, each written whole."""
    from .report import html_page, summary

    rows = read_rows(out_dir, jobs)
    write_text(out_dir / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_text(out_dir / "summary.md", summary(experiment, rows, len(jobs)))
    write_text(out_dir / "index.html", html_page(experiment, rows, len(jobs)))
    write_text(out_dir / "experiment.toml", Path(experiment.path).read_text())
    return rows


def run_experiment(experiment: Experiment, pipe, out_dir: str | Path, *, batch_size: int = 8,
                   max_memory: int | None = None, ranks: Ranks | None = None, progress: bool = True) -> RunStats:
    """Run the jobs of `experiment` not yet done in `out_dir` (on this rank's share, under torchrun), then
    (rank 0) write the tables. Packs of jobs of one sampling setup share the UNet calls: at most `batch_size`
    rows, and with `max_memory` (bytes) at most as many as fit by `batch.row_bytes`'s estimate."""
    ranks = ranks or Ranks()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    jobs_dir = out_dir / "jobs"
    fingerprint = model_fingerprint(pipe)
    jobs = expand(experiment, pipe.cfg, fingerprint)
    check_jobs(pipe, jobs)
    if ranks.main:
        jobs_dir.mkdir(parents=True, exist_ok=True)
        remove_stale(jobs_dir)
    pending_ids = ranks.share([j.id for j in jobs if not (jobs_dir / j.id).is_dir()] if ranks.main else None)
    pending = [j for j in jobs if j.id in set(pending_ids)]
    maps = store_sites(experiment.measures, pipe)
    units = pack(pending, batch_size, max_memory, lambda s: row_bytes(pipe, s, maps))
    model = {"path": experiment.model, "fingerprint": fingerprint, "family": pipe.cfg.family,
             "dtype": str(pipe.dtype).removeprefix("torch.")}
    ran = 0
    bar = tqdm(total=len(pending), desc=f"rank {ranks.rank}" if ranks.world > 1 else "jobs", disable=not progress)
    try:
        while (u := ranks.next_unit("units")) < len(units):
            unit = units[u]
            start = time.perf_counter()
            stores = [store_for(experiment.measures, pipe) for _ in unit]
            outcomes = run_unit(pipe, unit, stores)
            sampled = time.perf_counter() - start
            for o in outcomes:
                m0 = time.perf_counter()
                values = measure(experiment.measures, o, pipe)
                s = o.job.settings
                row = {"id": o.job.id, "index": o.job.index, "axes": o.job.axes, "settings": s.to_dict(),
                       "seed": s.seed, "model": model, "measures": values,
                       "images": [f"jobs/{o.job.id}/{i}.png" for i in range(len(o.result.images))],
                       "timing": {"sampling_s": sampled / len(unit), "measure_s": time.perf_counter() - m0,
                                  "packed_with": len(unit), "rank": ranks.rank, "device": str(pipe.device)}}
                with staged_folder(jobs_dir / o.job.id) as tmp:  # the images and the row appear together
                    save_images(o, tmp, {"model": experiment.model, "job": o.job.id})
                    (tmp / "row.json").write_text(json.dumps(clean(row), sort_keys=True, indent=1) + "\n")
                ran += 1
                bar.update(1)
    finally:
        bar.close()
        if ranks.world == 1:  # interrupted or not, the tables list what is done (rank 0 alone)
            write_tables(out_dir, experiment, jobs)
    ranks.barrier()
    if ranks.world > 1 and ranks.main:
        write_tables(out_dir, experiment, jobs)
    ranks.barrier()
    return RunStats(len(jobs), len(jobs) - len(pending), ran, time.perf_counter() - t0, out_dir)
