"""Execute the teaching notebooks and write their outputs into them, in place.

    python -m tests.refresh_notebooks              # every notebook in notebooks/
    python -m tests.refresh_notebooks 03 05        # the notebooks whose file name contains "03" or "05"

The notebooks are committed with their outputs (small PNG figures, short text) so that they read on
GitHub. Run this after changing a notebook, or anything its outputs depend on (the embedded model, the
sampler, an edit, a figure helper), and commit the notebooks it rewrote. `tests/test_notebooks.py`
executes every notebook exactly as `execute` does here and fails when the committed outputs differ from
the fresh ones.

Execution is pinned so that it repeats bit for bit on one machine: the kernel runs with one CPU thread
(PyTorch's CPU kernels sum in another order on another number of threads), a fixed hash seed, in a
temporary working directory, with no timing metadata, with consecutive prints merged into one output
(the kernel flushes them in timing-dependent chunks), and with figures as PNG only (IPython would add a
JPEG copy of every PIL image). A cell that raises stops the refresh, naming the cell; nothing is
written then.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
              # tqdm.auto warns at import in a kernel without ipywidgets (the notebooks pass progress=False)
              "PYTHONWARNINGS": "ignore:IProgress not found"}
# IPython shows a PIL image as PNG *and* JPEG; keep the lossless one only (half the file size)
KERNEL_ARGS = ["--DisplayFormatter.active_types=text/plain", "--DisplayFormatter.active_types=image/png"]
TIMEOUT_S = 600  # per cell
REFRESH = "python -m tests.refresh_notebooks"


def notebooks(patterns: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if patterns:
        paths = [p for p in paths if any(s in p.name for s in patterns)]
    return paths


def refresh_command(path: Path) -> str:
    return f"{REFRESH} {path.stem}"


def clear_outputs(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.metadata.pop("execution", None)
    return nb


def execute(path: Path) -> nbformat.NotebookNode:
    """The notebook at `path`, run top to bottom in a fresh kernel (raises nbclient's CellExecutionError,
    which names the cell, if one fails)."""
    nb = clear_outputs(nbformat.read(path, as_version=4))
    with tempfile.TemporaryDirectory(prefix="p2p-notebook-") as cwd:
        client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", record_timing=False,
                                         coalesce_streams=True, extra_arguments=KERNEL_ARGS,
                                         resources={"metadata": {"path": cwd}})
        client.execute(env={**os.environ, **KERNEL_ENV})
    return nb


def main(argv: list[str]) -> int:
    paths = notebooks(argv)
    if not paths:
        print(f"no notebook in {NOTEBOOK_DIR} matches {' '.join(argv)}", file=sys.stderr)
        return 2
    for path in paths:
        t0 = time.perf_counter()
        nb = execute(path)
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"{path.relative_to(NOTEBOOK_DIR.parent)}: executed in {time.perf_counter() - t0:.0f} s, "
              f"{path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
