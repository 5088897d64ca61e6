"""The teaching notebooks run, teach in the agreed shape, and are committed with their *current* outputs.

The notebooks in notebooks/ are committed with their outputs (small PNG figures and short text) so that
they read on GitHub without being run. Committed outputs go stale silently when the code under them
changes, so CI re-executes every notebook, exactly as `python -m tests.refresh_notebooks` does (fresh
kernel, one CPU thread, fixed hash seed, temporary working directory, the embedded model on the CPU in
float32), and compares the fresh outputs with the committed ones, cell by cell:

- the same number of outputs of the same kinds, no error output and no stderr stream;
- text (stdout, text/plain): equal after masking memory addresses (`at 0x...`) and durations
  (`1.2 s`, `30 ms`); integers equal, decimals within one unit of their last printed digit (float sums
  on another CPU may round a printed 0.715 either way);
- images (image/png): the same size, and the decoded pixels within a mean absolute difference of
  1/255 and a maximum of 32/255. A re-run on one machine repeats bit for bit; a run with two threads
  instead of one, a stand-in for another CPU, moved pixels by at most 4/255 (mean below 0.001/255),
  while a changed figure (another seed) differs by tens of levels on average.

A stale notebook fails with its name, the cell (its index and first line) and what differs, and the
command that rewrites its outputs: `python -m tests.refresh_notebooks NAME`; then commit the notebook.

The shape checked (the developers' guide): every notebook opens with a markdown cell that names the
paper's section, has prose before each code cell, ends with exercises, carries no widget output (pass
progress=False), and stays under MAX_BYTES.
"""
from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from tests.refresh_notebooks import execute, notebooks, refresh_command  # noqa: E402

NOTEBOOKS = notebooks()
MAX_BYTES = 512 * 1024  # aim: < 400 KB each
IMAGE_MEAN_TOL, IMAGE_MAX_TOL = 1.0, 32  # in 1/255 units
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
DURATION = re.compile(r"\b\d+(?:\.\d+)? ?(?:ms|s)\b")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def masked(s: str) -> str:
    return DURATION.sub("<duration>", ADDRESS.sub(" at 0x?", s))


def same_number(a: str, b: str) -> bool:
    """Integers equal; decimals within one unit of the last digit printed (0.71 ~ 0.72, 1.2e-05 ~ 1.3e-05)."""
    if a == b:
        return True
    mantissa, _, exponent = b.lower().partition("e")
    if "." not in mantissa:
        return False
    unit = 10.0 ** (int(exponent or 0) - len(mantissa.split(".")[1]))
    return abs(float(a) - float(b)) <= unit * 1.001


def text_difference(fresh: str, committed: str) -> str | None:
    """None when equal (addresses and durations masked, numbers to their printed precision), else the first
    differing line of each."""
    f, c = masked(fresh), masked(committed)
    if f == c:
        return None
    if NUMBER.split(f) == NUMBER.split(c):
        if all(same_number(x, y) for x, y in zip(NUMBER.findall(f), NUMBER.findall(c))):
            return None
    for lf, lc in zip(f.splitlines() + ["<end>"], c.splitlines() + ["<end>"]):
        if lf != lc:
            return f"fresh {lf!r}, committed {lc!r}"
    return "the text differs"


def png(data) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text(data)))).convert("RGB"), dtype=np.int16)


def image_difference(fresh, committed) -> str | None:
    a, b = png(fresh), png(committed)
    if a.shape != b.shape:
        return f"image size {a.shape[1]}x{a.shape[0]}, committed {b.shape[1]}x{b.shape[0]}"
    d = np.abs(a - b)
    if d.mean() > IMAGE_MEAN_TOL or d.max() > IMAGE_MAX_TOL:
        return f"pixels differ by {d.mean():.2f}/255 on average, {d.max()}/255 at most"
    return None


def output_difference(fresh, committed) -> str | None:
    if fresh.output_type != committed.output_type:
        return f"a {fresh.output_type} output where the committed one is {committed.output_type}"
    if fresh.output_type == "stream":
        if fresh.name != committed.name:
            return f"{fresh.name} where the committed output is {committed.name}"
        return text_difference(text(fresh.text), text(committed.text))
    if fresh.output_type in ("display_data", "execute_result"):
        if set(fresh.data) != set(committed.data):
            return f"output types {sorted(fresh.data)}, committed {sorted(committed.data)}"
        for mime in sorted(fresh.data):
            if mime == "image/png":
                why = image_difference(fresh.data[mime], committed.data[mime])
            else:
                why = text_difference(text(fresh.data[mime]), text(committed.data[mime]))
            if why:
                return f"{mime}: {why}"
    return None


def stale_cells(fresh: nbformat.NotebookNode, committed: nbformat.NotebookNode) -> list[str]:
    if [c.source for c in fresh.cells] != [c.source for c in committed.cells]:
        return ["the cells changed while the test ran"]
    problems = []
    for i, (f, c) in enumerate(zip(fresh.cells, committed.cells)):
        if f.cell_type != "code":
            continue
        where = f"cell {i} ({f.source.splitlines()[0] if f.source else 'empty'!r})"
        if len(f.outputs) != len(c.outputs):
            problems.append(f"{where}: {len(f.outputs)} outputs, {len(c.outputs)} committed")
            continue
        for k, (fo, co) in enumerate(zip(f.outputs, c.outputs)):
            why = output_difference(fo, co)
            if why:
                problems.append(f"{where}, output {k}: {why}")
    return problems


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_teaches_in_shape(path):
    nb = read(path)
    name = path.name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size / 1024:.0f} KiB: make its figures smaller"
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and re.search(r"Sec\. \d", first.source), \
        f"{name} must open with what it teaches and the paper's section (Sec. N)"
    assert last.cell_type == "markdown" and "Exercise" in last.source, f"{name} must end with exercises"
    for i, cell in enumerate(nb.cells[1:], start=1):
        if cell.cell_type == "code":
            assert nb.cells[i - 1].cell_type == "markdown", f"{name} cell {i}: say what to look for before it"
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert not any("widget" in m for m in out.get("data", {})), f"{name} cell {i}: widget output"
            assert not (out.output_type == "stream" and out.name == "stderr"), \
                f"{name} cell {i}: stderr output (a warning or a progress bar: pass progress=False)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_outputs_are_current(path):
    committed = read(path)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), \
        f"{path.name} is not committed as executed top to bottom: run `{refresh_command(path)}`"
    fresh = execute(path)  # raises, naming the cell, if a cell fails
    errors = [i for i, c in enumerate(fresh.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: cells {errors} raised"
    problems = stale_cells(fresh, committed)
    assert not problems, (f"{path.name}: the committed outputs are stale (they differ from a fresh run):\n  "
                          + "\n  ".join(problems[:10])
                          + f"\nRefresh them with `{refresh_command(path)}` and commit the notebook.")
