"""Throughput of `p2p run` on the embedded model: jobs per minute for one process with 2 threads against two
processes with one thread each (torchrun, gloo, dynamic assignment), and batched against unbatched on one
process.

    python benchmarks/experiments.py                  # 24 jobs of 20 steps, no measures
    python benchmarks/experiments.py --jobs-per-seed 8 --seeds 6 --steps 50
    python benchmarks/experiments.py --seeds 1 --jobs-per-seed 2 --steps 2   # a check that it runs (seconds)

Each variant runs `p2p run` in fresh processes on a fresh output folder. "run" is the time `p2p run` reports
(from the model loaded to the tables written, on rank 0: it includes waiting for the other ranks); "wall"
adds starting Python and torch, the rendezvous and loading the model; "CPU" is the user + system time of
all the processes of the variant (start included): on a machine shared with other work, wall times measure
the share of the CPUs the variant got as much as its speed, and jobs per CPU minute its efficiency.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWAPS = ("a big blue square on a green background", "a big red circle on a green background",
         "a small red square on a green background", "a big red square on a yellow background")
CROSS = (0.2, 0.4, 0.6, 0.8, 1.0, 0.0, 0.3, 0.5)


def experiment(path: Path, seeds: int, per_seed: int, steps: int, measures: str) -> int:
    """One source prompt; per seed, `per_seed` jobs (swaps x cross_replace values): the same-source packing
    case. Returns the number of jobs."""
    swaps = SWAPS[:max(1, min(len(SWAPS), per_seed // 2))]
    cross = CROSS[:max(1, per_seed // len(swaps))]
    targets = ", ".join(f'{{ label = "{i}", targets = ["{t}"] }}' for i, t in enumerate(swaps))
    path.write_text(f'model = "embedded"\nmeasures = [{measures}]\n[settings]\n'
                    f'prompt = "a big red square on a green background"\nsteps = {steps}\n[grid]\n'
                    f'swap = [{targets}]\ncross_replace = [{", ".join(map(str, cross))}]\n'
                    f'seed = [{", ".join(map(str, range(seeds)))}]\n')
    return len(swaps) * len(cross) * seeds


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every finished child and grandchild waited for
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], threads: int, out: Path) -> tuple[float, float, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    t0, c0 = time.perf_counter(), cpu_seconds()
    r = subprocess.run([*cmd, "--out-dir", str(out), "--quiet"], env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    if r.returncode:
        sys.exit(r.stderr)
    seconds = float(re.search(r", ([\d.]+) s; wrote", r.stdout).group(1))
    return seconds, wall, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs-per-seed", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch of the batched variant")
    p.add_argument("--max-memory", help="also pass --max-memory (e.g. 4GB) to the batched variants")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="run only the variants with these "
                   "threads per process (2 processes x 1 thread always runs)")
    p.add_argument("--measures", default="", help='e.g. \'"psnr_outside", "attention"\' (default none)')
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="p2p-bench-"))
    exp = tmp / "exp.toml"
    n = experiment(exp, args.seeds, args.jobs_per_seed, args.steps, args.measures)
    base = ["-m", "p2p", "run", str(exp)]
    batched = ["--batch-size", str(args.batch_size)] + (["--max-memory", args.max_memory] if args.max_memory else [])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    variants = {
        "1 process x 2 threads, unbatched": ([sys.executable, *base, "--batch-size", "1"], 2),
        "2 processes x 1 thread, unbatched": ([*torchrun, *base, "--batch-size", "1"], 1),
        "1 process x 1 thread, unbatched": ([sys.executable, *base, "--batch-size", "1"], 1),
        f"1 process x 1 thread, batch {args.batch_size}": ([sys.executable, *base, *batched], 1),
        f"1 process x 2 threads, batch {args.batch_size}": ([sys.executable, *base, *batched], 2),
    }
    print(f"{n} jobs (embedded model, 64 px, {args.steps} steps, guidance 5, 2 prompts each, measures: "
          f"{args.measures or 'none'}); {os.cpu_count()} CPUs")
    print("| variant | run s | jobs / min (run) | wall s | jobs / min (wall) | CPU s | jobs / CPU min |\n"
          "|---|---|---|---|---|---|---|")
    variants = {k: v for k, v in variants.items() if v[1] in args.threads or k.startswith("2 processes")}
    rate = {}
    for i, (name, (cmd, threads)) in enumerate(variants.items()):
        seconds, wall, cpu = run(cmd, threads, tmp / f"out{i}")
        shutil.rmtree(tmp / f"out{i}")
        rate[name] = (60 * n / seconds, 60 * n / wall, 60 * n / cpu)
        print(f"| {name} | {seconds:.1f} | {rate[name][0]:.0f} | {wall:.1f} | {rate[name][1]:.0f} | {cpu:.1f} | "
              f"{rate[name][2]:.0f} |", flush=True)
    pairs = [("2 processes x 1 thread, unbatched", "1 process x 2 threads, unbatched"),
             ("2 processes x 1 thread, unbatched", "1 process x 1 thread, unbatched"),
             (f"1 process x 1 thread, batch {args.batch_size}", "1 process x 1 thread, unbatched"),
             (f"1 process x 2 threads, batch {args.batch_size}", "1 process x 2 threads, unbatched")]
    for a, b in pairs:
        if a in rate and b in rate:
            print(f"{a} / {b}: {rate[a][0] / rate[b][0]:.2f}x (run), "
                  f"{rate[a][1] / rate[b][1]:.2f}x (wall), {rate[a][2] / rate[b][2]:.2f}x (per CPU second)")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
