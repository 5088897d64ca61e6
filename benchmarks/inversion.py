"""How well, and how fast, each inversion reconstructs real images: scene images (p2p/world/scenes.py) inverted with
their captions on the embedded model, then regenerated from the inversion alone (the source row of an edit).

    python benchmarks/inversion.py                              # 8 scenes, the model's steps and guidance, CPU
    python benchmarks/inversion.py --n 16 --device cuda --methods null-text direct

For each method it prints the mean (and min) PSNR of the reconstruction against the prepared input image,
the PSNR against the VAE round trip D(E(x)) (what a perfect inversion reaches: the latent is then exact),
the relative latent error mean((z_0 - E(x))^2) / mean(E(x)^2), and the wall time of the inversion per image
(without the reconstruction). "vae" is the round trip itself, the ceiling of every method; "ddim w=1" is DDIM
inversion sampled back without guidance (near exact, but an edit needs guidance).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2p.world import scenes  # noqa: E402
from p2p.files.images import load_image, psnr  # noqa: E402
from p2p.core.inversion import invert, reconstruct  # noqa: E402
from p2p.core.pipeline import Pipeline  # noqa: E402

METHODS = ("ddim w=1", "ddim", "null-text", "negative-prompt", "direct")


def run(pipe, samples, method, args) -> dict:
    name, guidance = ("ddim", 1.0) if method == "ddim w=1" else (method, args.guidance)
    rows = []
    for image, caption, _ in samples:
        image = load_image(image, pipe.cfg.image_size)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        inv = invert(pipe, image, caption, name, steps=args.steps, guidance=guidance, inner_steps=args.inner_steps,
                     progress=False)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        z = reconstruct(pipe, inv, progress=False)
        (rec,) = pipe.decode(z)
        (vae,) = pipe.decode(inv.z_0)
        rows.append({"psnr": psnr(rec, image), "psnr_vae": psnr(rec, vae), "vae": psnr(vae, image),
                     "latent": float((z.float().cpu() - inv.z_0).pow(2).mean() / inv.z_0.pow(2).mean()),
                     "seconds": seconds})
    return {k: [r[k] for r in rows] for k in rows[0]}


def fmt_db(values) -> str:
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return "inf (all exact)"
    text = f"{statistics.mean(finite):.2f} (min {min(finite):.2f})"
    return text if len(finite) == len(values) else f"{text}, {len(values) - len(finite)} of {len(values)} exact"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--n", type=int, default=8, help="number of scene images (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scene generator")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale of the edits (default: the model's)")
    p.add_argument("--inner-steps", type=int, default=10, help="null-text Adam iterations per step (default 10)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype="float32")
    args.steps = args.steps or pipe.cfg.steps
    args.guidance = pipe.cfg.guidance if args.guidance is None else args.guidance
    samples = scenes.sample(args.n, args.seed)
    print(f"{args.model} on {pipe.device} (float32, {torch.get_num_threads()} threads): {args.n} scenes (seed "
          f"{args.seed}), {pipe.cfg.image_size} px, {args.steps} DDIM steps, guidance {args.guidance}, null-text "
          f"{args.inner_steps} inner steps\n")
    print("| method | PSNR vs input (dB) | PSNR vs VAE round trip (dB) | latent error | inversion s/image |")
    print("|---|---|---|---|---|")
    vae_row = None
    for method in args.methods:
        r = run(pipe, samples, method, args)
        vae_row = vae_row or r["vae"]
        print(f"| {method} | {fmt_db(r['psnr'])} | {fmt_db(r['psnr_vae'])} | {statistics.mean(r['latent']):.2e} | "
              f"{statistics.mean(r['seconds']):.2f} |", flush=True)
    print(f"| vae (D(E(x)), the ceiling) | {fmt_db(vae_row)} | inf | 0 | - |")


if __name__ == "__main__":
    main()
