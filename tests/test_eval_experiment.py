"""`p2p eval` as an experiment (p2p/world/evaluate.py: experiment_text, run by p2p/experiments/): its rows are those
of `evaluate` (each job run in this process, one after the other) for the same cases, number for number, whether
the jobs run through `p2p eval`, `p2p run` of its experiment file or two torchrun processes; a rerun of `p2p eval`
in the same folder runs nothing again; configs/experiments/scene-eval.toml is the file `experiment_text` writes and
covers every row kind. Few steps, one case per row kind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2p.cli.main import main
from p2p.core.pipeline import Pipeline
from p2p.world.evaluate import PARTS, eval_rows, evaluate, experiment_text, part_of, plan
from p2p.world.report import _clean

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


@pytest.fixture(scope="module")
def direct():
    """evaluate's rows for one case per row kind, every part, in this process: as eval.json writes them."""
    pipe = Pipeline.from_pretrained("embedded", device="cpu")
    return [_clean(r) for r in evaluate(pipe, n=1, steps=STEPS, progress=False)]


def eval_json(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def test_scene_eval_file_is_the_generated_one_and_covers_every_row_kind():
    from p2p.experiments.measures import MEASURES
    from p2p.experiments.spec import read_experiment

    path = ROOT / "configs" / "experiments" / "scene-eval.toml"
    assert path.read_text() == experiment_text(2, 0)  # regenerate it with experiment_text if evaluate changes
    exp = read_experiment(path, known_measures=tuple(MEASURES))
    kinds = [d.get("kind", "edit") for d, _ in exp.points]
    assert {part_of(k, s) for k, s in zip(kinds, exp.settings())} == set(PARTS)
    assert [part_of(j.kind, j.settings) for _, j in plan(2)] == [part_of(k, s) for k, s in zip(kinds, exp.settings())]


def test_p2p_eval_has_the_rows_of_evaluate_and_resumes(direct, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--n", "1", "--steps", str(STEPS), "--out-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    d = eval_json(out)
    assert json.dumps(d["rows"]) == json.dumps(direct)  # the same numbers, keys in the same order
    assert printed.split("\n1 cases per row")[0].strip() == (out / "eval.md").read_text().strip()
    examples = sorted(p.name for p in (out / "examples").iterdir())
    assert len(examples) == len(direct) and "vae_000.png" in examples and "fader_colour_000.png" in examples
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(results) == len(plan(1)) and all(r["timing"]["packed_with"] == 1 for r in results)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "jobs").rglob("*")}
    assert main(["eval", "--n", "1", "--steps", str(STEPS), "--out-dir", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.split("\n1 cases per row")[0] == printed.split("\n1 cases per row")[0]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # every job was found done: none ran again
    assert eval_json(out)["rows"] == d["rows"]


def test_p2p_run_of_the_eval_experiment_has_the_rows_of_evaluate(direct, tmp_path):
    exp = tmp_path / "scene-eval.toml"
    exp.write_text(experiment_text(1, 0, steps=STEPS))
    out = tmp_path / "out"
    assert main(["run", str(exp), "--out-dir", str(out), "--quiet", "--batch-size", "1"]) == 0
    rows = eval_rows([json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()])
    assert [_clean({k: v for k, v in r.items() if k != "images"}) for r in rows] == direct
    for r in rows:  # each row names the images it read, among its job's
        assert r["images"] and all((out / p).is_file() for p in r["images"])


def test_torchrun_shards_p2p_eval(tmp_path):
    """Two processes (gloo on the CPU) write the rows and tables of one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = ["-m", "p2p", "eval", "--cases", "1", "--steps", "4", "--parts", "swaps,blend,vae", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, *base, "--out-dir", str(one)], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *base,
                         "--out-dir", str(two)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    assert eval_json(one)["rows"] == eval_json(two)["rows"]
    assert (one / "eval.md").read_text() == (two / "eval.md").read_text()
    ranks = {json.loads(line)["timing"]["rank"] for line in (two / "results.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}
    assert r2.stdout.count("Word swaps and refinement") == 1  # rank 0 alone prints the tables


def test_p2p_eval_under_torchrun_needs_an_out_dir(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("p2p.experiments.dist.Ranks.from_env", classmethod(lambda cls: cls(0, 2)))
    assert main(["eval", "--n", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --out-dir" in err, err
