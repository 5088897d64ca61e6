"""Experiments (`p2p run`, p2p/experiments/) on the embedded model: bad files fail before any model loads;
packed batches give the images of separate edits; a rerun skips finished jobs and a changed grid runs only
its new jobs; a killed run resumes with no job missing or duplicated; a 2-process torchrun run on the CPU
(gloo) writes exactly the files and rows of a 1-process run. Few steps, small grids."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.errors import UserError

from p2p.cli.main import main
from p2p.core.pipeline import Pipeline
from p2p.files.output import read_settings

ROOT = Path(__file__).resolve().parents[1]
SRC = "a big red square on a green background"
GRID = f"""
model = "embedded"
measures = ["psnr_outside", "attention", "judge"]
[settings]
prompt = "{SRC}"
steps = 4
[grid]
swap = [{{ label = "colour", targets = ["a big blue square on a green background"] }},
        {{ label = "shape", targets = ["a big red circle on a green background"], blend = ["square", "circle"] }}]
cross_replace = [0.2, 0.8]
seed = SEEDS
"""


def write(tmp_path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "jobs").rglob("*.png"))}


# --- bad files -------------------------------------------------------------------------------------------

BIG = ", ".join(str(i / 1000) for i in range(1000))
BAD = {
    "unknown top-level key": ("model = 'embedded'\nstep = 4\n[settings]\nprompt = 'a'\ntargets = ['b']\n",
                              "unknown key 'step' (did you mean 'steps' in [settings]?)"),
    "unknown setting": (f"[settings]\nprompt = '{SRC}'\ntargets = ['{SRC}']\ncross_replce = 0.4\n",
                        "unknown setting 'cross_replce' (did you mean 'cross_replace'?)"),
    "unknown grid axis": (f"[settings]\nprompt = '{SRC}'\ntargets = ['{SRC}']\n[grid]\nsteeps = [4, 8]\n",
                          "unknown setting 'steeps' in [grid] (did you mean 'steps'?)"),
    "word not in a prompt": (f"[settings]\nprompt = '{SRC}'\ntargets = ['{SRC}']\nblend = ['circle']\n",
                             "blend word 'circle' is in none of the prompts"),
    "grid too large": (f"[settings]\nprompt = '{SRC}'\ntargets = ['{SRC}']\n[grid]\nself_replace = [{BIG}]\n"
                       f"cross_replace = [{BIG}]\n", "the grid makes 1,000,000 jobs"),
    "unknown measure": (f"measures = ['psnr']\n[settings]\nprompt = '{SRC}'\ntargets = ['{SRC}']\n",
                        "unknown measure 'psnr'"),
    "steps out of range": (f"[settings]\nprompt = '{SRC}'\ntargets = ['{SRC}']\n[grid]\nsteps = [4, 0]\n",
                           "steps must be a whole number of DDIM steps from 1 to 1000"),
    "swap of unequal length": (f"[settings]\nprompt = '{SRC}'\ntargets = ['a big red striped square on a green "
                               "background']\n", "a word swap (mode 'replace') needs targets with as many words"),
    "no targets": (f"[settings]\nprompt = '{SRC}'\n", "mode 'replace' needs targets"),
    "bad window": (f"[settings]\nprompt = '{SRC}'\ntargets = ['{SRC}']\n[grid]\nself_replace = [[0.6, 0.2]]\n",
                   "self_replace must be a fraction of the steps"),
    "judge off the embedded model": (f"model = 'weights/sd'\nmeasures = ['judge']\n[settings]\nprompt = '{SRC}'\n"
                                     f"targets = ['{SRC}']\n", "measure 'judge' reads images of the embedded"),
    "targets not a list": (f"[settings]\nprompt = '{SRC}'\ntargets = '{SRC}'\n", "targets must be a list"),
    "not TOML": ("[settings\nprompt = 1\n", "is not valid TOML"),
    "unknown kind": (f"[settings]\nprompt = '{SRC}'\nkind = 'generation'\n", "unknown kind 'generation'; a job is one"),
    "round trip without a scene": ("[settings]\nkind = 'vae'\nprompt = 'a'\n", "a kind = 'vae' job needs scene"),
    "bad scene": ("[settings]\nkind = 'vae'\nscene = { background = 'green' }\n", "a scene is a table"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_fail_before_the_model_loads(case, tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Pipeline, "from_pretrained", no_model)
    text, expected = BAD[case]
    out = tmp_path / "out"
    assert main(["run", str(write(tmp_path, text)), "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("p2p run: error: ") and expected in err, err
    assert not out.exists()


@pytest.mark.parametrize("name,jobs", [("cross-self-grid", 120), ("layer-step-ablation", 80), ("scene-swaps", 58), ("scene-eval", 24),
                                       ("README", 36)])
def test_example_files_read(name, jobs, tmp_path):
    from p2p.experiments.measures import MEASURES
    from p2p.experiments.spec import read_experiment

    if name == "README":  # the file format example of the README's Experiments section
        text = (ROOT / "README.md").read_text().split("## Experiments")[1].split("```toml\n")[1].split("```")[0]
        path = write(tmp_path, text)
    else:
        path = ROOT / "configs" / "experiments" / f"{name}.toml"
    assert len(read_experiment(path, known_measures=tuple(MEASURES)).points) == jobs


# --- packing, resuming, changed grids ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("embedded", device="cpu")


def test_packed_batch_gives_the_images_of_separate_edits(pipe):
    """Jobs of different sources, seeds and settings (local blend, reweight) in one batch (`run_edits`, which
    the runner's `run_unit` calls) against `run_edit` of each alone: equal up to float rounding (a different
    batch size), at most 2/255 on a pixel."""
    from p2p import run_edits
    from p2p.core.run import run_edit
    from p2p.core.settings import EditSettings

    settings = [EditSettings(SRC, ("a big blue square on a green background",), steps=6, seed=1, cross_replace=0.2),
                EditSettings(SRC, ("a big red circle on a green background",), steps=6, seed=1, self_replace=0.8,
                             blend=("square", "circle")),
                EditSettings("a small blue star on a red background", ("a small green star on a red background",),
                             steps=6, seed=3),
                EditSettings(SRC, (SRC,), mode="reweight", reweight={"red": [0.0, 2.0]}, steps=6, seed=2)]
    settings = [s.resolved(pipe.cfg) for s in settings]
    results = run_edits(pipe, settings)
    worst = 0
    for r, s in zip(results, settings):
        alone = run_edit(pipe, s, progress=False).images
        assert r.settings == s and len(r.images) == len(alone) == len(s.prompts)
        for a, b in zip(r.images, alone):
            d = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
            worst = max(worst, int(d.max()))
            assert d.mean() < 0.02
    assert worst <= 2


def test_run_edits_refuses_edits_of_different_sampling_setups(pipe):
    from p2p import run_edits
    from p2p.core.settings import EditSettings

    target = ("a big blue square on a green background",)
    with pytest.raises(UserError, match=r"differ in steps \(4, 6\).*run_edit one by one"):
        run_edits(pipe, [EditSettings(SRC, target, steps=6), EditSettings(SRC, target, steps=4)])
    with pytest.raises(UserError, match="eta 0"):
        run_edits(pipe, [EditSettings(SRC, target, steps=4, eta=0.5), EditSettings(SRC, target, steps=4)])
    assert run_edits(pipe, []) == []


def test_memory_estimate_grows_with_the_batch_and_bounds_the_packing(pipe):
    """batch.row_bytes: a batch's estimate grows with its rows; a budget below two jobs' rows packs one job per
    batch, a large one leaves --batch-size the limit, one in between the rows it holds."""
    from p2p.core.settings import EditSettings
    from p2p.experiments.batch import batch_bytes, row_bytes
    from p2p.experiments.spec import Job, pack

    targets = ("a big blue square on a green background", "a big red circle on a green background")
    settings = [EditSettings(SRC, (targets[i % 2],), steps=4, seed=i // 2).resolved(pipe.cfg) for i in range(8)]
    jobs = [Job(str(i), i, s, {}) for i, s in enumerate(settings)]
    estimates = [batch_bytes(pipe, settings[:k]) for k in range(1, 9)]
    assert all(a < b for a, b in zip(estimates, estimates[1:]))  # every job adds a row (its source shared)
    each = row_bytes(pipe, settings[0])
    assert each == row_bytes(pipe, settings[1]) > row_bytes(pipe, replace(settings[0], targets=()))  # maps of the edit
    assert row_bytes(pipe, replace(settings[0], low_memory=True)) < each  # one guidance branch at a time
    assert row_bytes(pipe, replace(settings[0], height=128, width=128)) > 3 * each
    size = lambda units: [len(u) for u in units]  # noqa: E731
    assert size(pack(jobs, 8, 2 * each - 1, lambda s: row_bytes(pipe, s))) == [1] * 8
    assert size(pack(jobs, 5, 10**15, lambda s: row_bytes(pipe, s))) == size(pack(jobs, 5)) == [3, 3, 2]
    assert size(pack(jobs, 8, 3 * each, lambda s: row_bytes(pipe, s))) == [2, 2, 2, 2]  # 3 rows: source + 2
    assert size(pack(jobs, 2, 3 * each, lambda s: row_bytes(pipe, s))) == [1] * 8  # the smaller limit holds


def test_max_memory_packs_as_estimated_with_the_images_of_separate_edits(tmp_path, capsys):
    """`p2p run --max-memory`: a budget below one job's rows runs every job alone, bit for bit as --batch-size 1;
    a large one packs as --batch-size alone, within float rounding of the separate edits."""
    exp = write(tmp_path, GRID.replace("SEEDS", "[0, 1]").replace('"psnr_outside", "attention", "judge"', ""))
    out = {name: tmp_path / name for name in ("alone", "tiny", "four", "big")}
    for name, flags in (("alone", ["--batch-size", "1"]), ("tiny", ["--max-memory", "1KB"]),
                        ("four", ["--batch-size", "4"]), ("big", ["--batch-size", "4", "--max-memory", "1TB"])):
        assert main(["run", str(exp), "--out-dir", str(out[name]), "--quiet", *flags]) == 0
    packed = {name: [r["timing"]["packed_with"] for r in rows(out[name])] for name in out}
    assert packed["alone"] == packed["tiny"] == [1] * 8 and packed["big"] == packed["four"] == [2] * 8
    assert files(out["tiny"]) == files(out["alone"])
    alone, big = files(out["alone"]), files(out["big"])
    for name in alone:
        if not name.endswith("grid.png"):
            a, b = (np.asarray(Image.open(out[k] / name), np.int16) for k in ("alone", "big"))
            assert np.abs(a - b).max() <= 2, name
    assert main(["run", str(exp), "--out-dir", str(tmp_path / "bad"), "--max-memory", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-memory: takes a memory size" in err and "e.g. 4GB" in err, err


def test_rerun_skips_done_jobs_and_a_changed_grid_runs_only_new_ones(tmp_path, capsys):
    exp = write(tmp_path, GRID.replace("SEEDS", "[0, 1]"))
    out = tmp_path / "out"
    assert main(["run", str(exp), "--out-dir", str(out), "--quiet"]) == 0
    assert "8 jobs: 0 done before, 8 run here" in capsys.readouterr().out
    first = rows(out)
    assert len(first) == len({r["id"] for r in first}) == 8
    assert [r["index"] for r in first] == list(range(8))
    for r in first:  # every image carries the settings of its row; every job has its measures
        assert [Path(p).name for p in r["images"]] == ["0.png", "1.png"]
        meta = read_settings(out / r["images"][1])
        assert {k: meta[k] for k in r["settings"]} == r["settings"] and meta["job"] == r["id"]
        wanted = {"psnr_outside", "attn_entropy", "judge", "mask_iou", "success", "psnr_outside_objects"}
        assert wanted <= set(r["measures"])
    stamps = {p: p.stat().st_mtime_ns for p in (out / "jobs").rglob("*")}
    html = (out / "index.html").read_text()
    assert html.count("<img ") == 8 and "<script" not in html
    summary = (out / "summary.md").read_text()  # its means against the rows'
    table = summary.split("## By cross_replace")[1].split("##")[0].splitlines()
    column = table[2].split(" | ").index("mask_iou")
    for value in ("0.2", "0.8"):
        iou = [r["measures"]["mask_iou"][0] for r in first if r["axes"]["cross_replace"] == value]
        iou = [x for x in iou if x is not None]
        line = next(x for x in table if x.startswith(f"| {value} | 4 |"))
        assert line.split(" | ")[column] == f"{sum(iou) / len(iou):.3g}"

    assert main(["run", str(exp), "--out-dir", str(out), "--quiet"]) == 0
    assert "8 jobs: 8 done before, 0 run here" in capsys.readouterr().out
    assert rows(out) == first

    exp.write_text(GRID.replace("SEEDS", "[0, 1, 2]"))  # a new seed: 4 new jobs, the 8 others unchanged
    assert main(["run", str(exp), "--out-dir", str(out), "--quiet"]) == 0
    assert "12 jobs: 8 done before, 4 run here" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing of the finished jobs was rewritten
    after = rows(out)
    assert len(after) == len({r["id"] for r in after}) == 12
    assert {r["id"] for r in first} < {r["id"] for r in after}


def finished(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "jobs").iterdir() if not p.name.startswith(".")) \
        if (out / "jobs").is_dir() else []


def stop_after(cmd: list[str], cwd: Path, out: Path, n: int, sig: int) -> subprocess.CompletedProcess:
    """Start `cmd`, send `sig` once `n` more job folders than now exist, and wait for it to end."""
    start = len(finished(out))
    # SIGINT at its default, so that Python turns it into KeyboardInterrupt even when this test runs where it is
    # ignored (a background job of a non-interactive shell, as CI scripts often are)
    proc = subprocess.Popen(cmd, env=env(), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and len(finished(out)) < start + n:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be stopped"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_interrupted_and_killed_runs_resume_with_no_job_missing_or_duplicated(tmp_path):
    exp = write(tmp_path, GRID.replace("SEEDS", "[0, 1, 2, 3]").replace("steps = 4", "steps = 6"))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "p2p", "run", str(exp), "--out-dir", str(out), "--quiet", "--batch-size", "2"]
    r = stop_after(cmd, tmp_path, out, 2, signal.SIGINT)  # Ctrl-C: the table lists the finished jobs
    assert r.returncode == 130 and "interrupted" in r.stderr, r.stderr
    assert [row["id"] for row in rows(out)] and sorted(row["id"] for row in rows(out)) == finished(out)
    stop_after(cmd, tmp_path, out, 2, signal.SIGKILL)  # killed: no table written, no half-written job
    killed = finished(out)
    assert 4 <= len(killed) < 16
    for name in killed:  # a job folder exists only complete
        assert sorted(p.name for p in (out / "jobs" / name).iterdir()) == ["0.png", "1.png", "grid.png", "row.json"]
    r = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"16 jobs: {len(killed)} done before, {16 - len(killed)} run here" in r.stdout
    final = rows(out)
    assert len(final) == len({r["id"] for r in final}) == 16
    assert sorted(p.name for p in (out / "jobs").iterdir()) == sorted(r["id"] for r in final)  # no leftovers
    for row in final:
        with Image.open(out / row["images"][1]) as img:
            img.load()


def test_torchrun_two_processes_write_the_files_and_rows_of_one(tmp_path):
    exp = write(tmp_path, GRID.replace("SEEDS", "[0, 1]"))
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["-m", "p2p", "run", str(exp), "--quiet", "--batch-size", "2"]
    r1 = subprocess.run([sys.executable, *base, "--out-dir", str(one)], env=env(), cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                         *base, "--out-dir", str(two)], env=env(), cwd=tmp_path, capture_output=True, text=True,
                        timeout=180)
    assert r2.returncode == 0, r2.stderr
    assert "(rank 0 of 2)" in r2.stdout
    a, b = files(one), files(two)
    assert len(a) == 8 * 3 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []  # bit-identical images (and their metadata)
    ra, rb = rows(one), rows(two)
    assert {r["timing"]["rank"] for r in rb} == {0, 1}  # both ranks took jobs
    for r in ra + rb:
        r.pop("timing")
    assert ra == rb
    for name in ("summary.md", "index.html"):
        assert (two / name).is_file()
