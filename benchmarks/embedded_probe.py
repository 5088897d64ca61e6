"""Probes of a scene-world model (the embedded one, or a short training run's export) that `p2p eval` does not make:
where its shapes are lost along the noise levels, whether its cross-attention maps tell two objects apart, and
how far a word swap moves the text states of the words after it.

    python benchmarks/embedded_probe.py                           # the shipped model
    python benchmarks/embedded_probe.py --model runs/short/export --n 48 --pairs 12
    python benchmarks/embedded_probe.py --indices "" --pairs 0 --context 12   # probe 4 alone

1. Shapes kept from t: real latents z_0 = E(x) of n single-object scenes are noised to z_t = sqrt(alpha_bar_t) z_0
   + sqrt(1 - alpha_bar_t) eps at the DDIM timestep of index k (of the model's steps), denoised from there with the
   scene's caption, decoded and read by the judge: the share read right per attribute. At the first timestep this
   is plain generation for a zero-terminal-SNR model; at later ones it shows from which noise level the model
   keeps what the latent already holds (SDEdit, Meng et al. 2022, as a probe).
2. Maps of two objects: `pairs` two-object colour swaps of `p2p eval`'s local-blend row, with blend on the shape
   word over the --blend-res maps and without: the untouched object's PSNR and the edit's success; and on the
   blend run's source, each colour and shape word's map (averaged over steps and layers, as local blend does,
   normalised by its maximum) on its own object, on the other object and on the background.
3. The latent (--latent): the VAE's round trip of n single-object scenes (PSNR, every attribute read); the share
   of the latent's energy (mean removed, per scene and channel) below 1/4 cycle per latent pixel (Skorokhodov et
   al. 2025 find diffusion draws high frequencies worst); the shapes read after adding noise of std 0.5 to the
   scaled latent (how forgiving the decoder is); and the RMS difference of the scaled latents of the same scene
   with another shape, against another colour (how much of the latent the shape moves).
4. Context (--context N): N colour swaps of `p2p eval`'s cases. How far the swap moves the text states of the
   tokens after the swapped word (|psi(P)_i - psi(P*)_i| / |psi(P)_i|, the next 7 tokens: a causal text encoder
   carries the new colour into "square on a green background"), and the P2P edit's PSNR outside the object with
   the cross-attention maps injected for 80% and for 100% of the steps, and for 80% with the target's states after
   the swapped word set to the source's (only the swapped word's state differs). Prompt-to-Prompt fixes the maps M,
   not the values; where the later tokens' states move, even full injection changes the background.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from p2p.core.local_blend import LocalBlend, word_mask  # noqa: E402
from p2p.core.pipeline import Pipeline  # noqa: E402
from p2p.core.run import run_edit  # noqa: E402
from p2p.core.settings import EditSettings, build_controller  # noqa: E402
from p2p.core.sites import SiteSelection  # noqa: E402
from p2p.files.images import psnr, to_tensor  # noqa: E402
from p2p.files.loading import EMBEDDED_DIR  # noqa: E402
from p2p.experiments.batch import run_edits  # noqa: E402
from p2p.world import scenes  # noqa: E402
from p2p.world.evaluate import (_assign, compare, jobs_blend, make_cases, make_pair_cases,  # noqa: E402
                                 parse_caption, read, score_blend, truth)
from p2p.world.judge import judge  # noqa: E402

READ = ("shape", "colour", "pattern", "size")


def encode(pipe: Pipeline, images: list) -> torch.Tensor:
    """The scaled latents z_0 (posterior means) of a list of scene images."""
    return pipe.vae.encode(torch.cat([to_tensor(im) for im in images]))


@torch.no_grad()
def shapes_kept(pipe: Pipeline, n: int, indices: list[int], guidance: float, seed: int = 123) -> dict:
    rng = np.random.default_rng(seed)
    items = [scenes.sample_scene(rng, max_things=1) for _ in range(n)]
    z_0 = encode(pipe, [scenes.render(s)[0] for s in items])
    cond, uncond = pipe.encode_text([scenes.caption(s) for s in items]), pipe.encode_negative("").expand(n, -1, -1)
    steps = pipe.cfg.steps
    timesteps = pipe.ddim.timesteps(steps)
    eps = torch.randn(z_0.shape, generator=torch.Generator().manual_seed(0))
    out = {}
    for k in indices:
        t = timesteps[k]
        a = pipe.ddim.alpha_bar[t]
        z_t = a.sqrt() * z_0 + (1 - a).sqrt() * eps
        z = pipe.denoise(z_t, cond, uncond, steps=steps, guidance=guidance, start=k, progress=False)
        right = dict.fromkeys(READ, 0)
        for image, s in zip(pipe.decode(z), items):
            r = judge(image, 1)
            for attr in READ:
                right[attr] += bool(r.things) and getattr(r.things[0], attr) == getattr(s.things[0], attr)
        out[(k, t, float(a))] = {attr: v / n for attr, v in right.items()}
    return out


def two_objects(pipe: Pipeline, pairs: int, res: int) -> tuple[dict, dict]:
    rows, maps_on = {"without blend": [], "with blend": []}, {}
    for k, case in enumerate(make_pair_cases(pairs, 0)):
        for name in rows:
            (job,) = jobs_blend(case, name == "with blend", None, k)
            s = job.settings
            if name == "with blend":
                s = replace(s, blend_sites=SiteSelection(kinds=("cross",), res=(res,)))
            result = run_edit(pipe, s, progress=False)
            row = score_blend("blend", job.settings, None, result.images)[0]
            rows[name].append(row)
            if name == "without blend" or "psnr_other" not in row:
                continue
            things = parse_caption(s.prompt)[0]
            source = judge(result.images[0], n_things=2)
            order = _assign(source.things, things)
            blend = next(c for c in result.controller.controllers if isinstance(c, LocalBlend))
            M = torch.stack([blend.average(site) for site in blend.select("cross", blend.sites)]).mean(0)[0]
            h = M.shape[0]
            cover = [F.adaptive_avg_pool2d(torch.tensor(source.things[order[j]].mask, dtype=torch.float32)[None, None], h)[0, 0]
                     for j in range(2)]
            on, background = [c > 0.5 for c in cover], (cover[0] + cover[1]) < 0.05
            if not (on[0].any() and on[1].any()):
                continue
            for j, thing in enumerate(things):
                for role in ("colour", "shape"):
                    tokens = word_mask(pipe.tokenizer, [s.prompt], [thing[role]], role)[0].bool()
                    m = M[..., tokens].sum(-1)
                    m = m / m.max()
                    maps_on.setdefault(role, []).append((m[on[j]].mean().item(), m[on[1 - j]].mean().item(),
                                                         m[background].mean().item()))
    return rows, maps_on


@torch.no_grad()
def latent_probe(pipe: Pipeline, n: int, seed: int = 99) -> dict:
    rng = np.random.default_rng(seed)
    items = [scenes.sample_scene(rng, max_things=1) for _ in range(n)]
    renders = [scenes.render(s)[0] for s in items]
    z_0 = encode(pipe, renders)
    trips = pipe.decode(z_0)
    out = {"PSNR (dB)": np.mean([psnr(a, b) for a, b in zip(renders, trips)]),
           "every attribute read": np.mean([all(read(im)[k] == v for k, v in truth(s).items())
                                                    for im, s in zip(trips, items)])}
    zc = z_0 - z_0.mean(dim=(2, 3), keepdim=True)
    energy = torch.fft.fft2(zc).abs() ** 2
    f = torch.fft.fftfreq(z_0.shape[-1])
    out["energy below 1/4 cycle"] = ((energy * ((f[:, None] ** 2 + f[None, :] ** 2).sqrt() < 0.25)).sum()
                                     / energy.sum()).item()
    noisy = pipe.decode(z_0 + 0.5 * torch.randn(z_0.shape, generator=torch.Generator().manual_seed(1)))
    out["shape read, latent + 0.5 noise"] = np.mean([read(im)["shape"] == s.things[0].shape
                                                     for im, s in zip(noisy, items)])
    shape_d, colour_d = [], []
    for s in items[:24]:
        t = s.things[0]
        other_colour = next(c for c in scenes.COLOURS if c not in (s.background, t.colour))
        variants = [t, replace(t, shape=scenes.SHAPES[(scenes.SHAPES.index(t.shape) + 1) % len(scenes.SHAPES)]),
                    replace(t, colour=other_colour)]
        z = encode(pipe, [scenes.render(replace(s, things=(v,)))[0] for v in variants])
        shape_d.append((z[1] - z[0]).pow(2).mean().sqrt().item())
        colour_d.append((z[2] - z[0]).pow(2).mean().sqrt().item())
    out["latent RMS moved by a shape / colour change"] = f"{np.mean(shape_d):.2f} / {np.mean(colour_d):.2f}"
    return out


def context(pipe: Pipeline, n: int) -> dict:
    """Probe 4: the text states' move after the swapped word, and P2P's PSNR outside the object per cross_replace."""
    cases = make_cases(n, seed=0)
    pairs = [(c.prompt, scenes.caption(scenes.with_attribute(c.scene, 0, "colour", c.swaps["colour"]))) for c in cases]
    lasts = [last_swapped(pipe, a, b) for a, b in pairs]
    moves = []
    for (a, b), last in zip(pairs, lasts):
        with torch.no_grad():
            h = pipe.encode_text([a, b])[:, last + 1:last + 8]
        moves.append(((h[0] - h[1]).norm(dim=-1) / h[0].norm(dim=-1)).mean().item())
    out = {"text states after the swapped word, relative move": float(np.mean(moves))}
    for tau in (0.8, 1.0):
        jobs = [EditSettings(a, (b,), seed=c.seed, cross_replace=tau) for (a, b), c in zip(pairs, cases)]
        res = run_edits(pipe, jobs)
        out[f"cross_replace {tau}: success, mask IoU, PSNR outside (dB)"] = _swaps(cases, [r.images for r in res])
    images = [edit_with_source_context(pipe, EditSettings(a, (b,), seed=c.seed), last)
              for (a, b), c, last in zip(pairs, cases, lasts)]
    out["cross_replace 0.8, later states from the source: success, mask IoU, PSNR outside (dB)"] = _swaps(cases, images)
    return out


def _swaps(cases, images) -> str:
    """Colour swaps' success, mask IoU and PSNR outside the object (`p2p eval`'s measures), averaged."""
    rows = [compare(read(x[0]), x[0], x[1], "colour", c.swaps["colour"]) for c, x in zip(cases, images)]
    return (f"{np.mean([r['success'] for r in rows]):.0%}, {np.nanmean([r.get('iou', np.nan) for r in rows]):.2f}, "
            f"{np.nanmean([r.get('psnr_out', np.nan) for r in rows]):.1f}")


def last_swapped(pipe: Pipeline, a: str, b: str) -> int:
    ia, ib = pipe.tokenizer.encode([a])[0], pipe.tokenizer.encode([b])[0]
    return max(i for i in range(len(ia)) if ia[i] != ib[i])


def edit_with_source_context(pipe: Pipeline, s: EditSettings, last: int) -> list:
    """`run_edit` (p2p/core/run.py, its steps repeated here) of a one-target swap, the target's text states after
    token `last` replaced by the source's: run_edit takes prompts, not states."""
    s = s.resolved(pipe.cfg)
    edit = build_controller(s, pipe.tokenizer, s.steps, model=pipe.cfg)
    g = torch.Generator("cpu").manual_seed(s.seed)
    z_T = pipe.initial_latent(g, s.height, s.width)
    cond = pipe.encode_text(s.prompts)
    cond = torch.cat([cond[:1], torch.cat([cond[1:, :last + 1], cond[:1, last + 1:]], dim=1)])
    z_0 = pipe.denoise(cond=cond, steps=s.steps, eta=s.eta, generator=g, guidance=s.guidance, z_T=z_T,
                       uncond=pipe.encode_negative(s.negative_prompt), controller=edit, progress=False)
    return pipe.decode(z_0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(EMBEDDED_DIR), help="a scene-world model folder (default: the shipped one)")
    p.add_argument("--n", type=int, default=48, help="single-object scenes for the shapes-kept probe")
    p.add_argument("--indices", default="0,10,20,30,40",
                   help="timestep indices (of the model's steps) to start from; an empty string skips that probe")
    p.add_argument("--pairs", type=int, default=12, help="two-object colour swaps (0: skip that probe)")
    p.add_argument("--blend-res", type=int, default=16, help="the maps local blend reads")
    p.add_argument("--guidance", type=float, help="default: the model's")
    p.add_argument("--latent", action="store_true", help="also probe the VAE's latent (probe 3)")
    p.add_argument("--context", type=int, default=0, metavar="N", help="also probe 4 on N colour swaps")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained(args.model)
    w = pipe.cfg.guidance if args.guidance is None else args.guidance
    if args.latent:
        print(f"{args.model}: the latent, {args.n} single-object scenes")
        for name, v in latent_probe(pipe, args.n).items():
            print(f"  {name}: {v:.2f}" if isinstance(v, float) else f"  {name}: {v}")
    if args.context:
        print(f"{args.model}: context, {args.context} colour swaps, w = {pipe.cfg.guidance}")
        for name, v in context(pipe, args.context).items():
            print(f"  {name}: {v:.2f}" if isinstance(v, float) else f"  {name}: {v}")
    indices = [int(i) for i in args.indices.split(",") if i.strip()]
    if indices:
        print(f"{args.model}: shapes kept, {args.n} single-object scenes, w = {w}")
    for (k, t, a), right in (shapes_kept(pipe, args.n, indices, w) if indices else {}).items():
        print(f"  from step {k:2d} (t = {t:3d}, alpha_bar {a:.4f}): " + ", ".join(f"{x} {v:.0%}" for x, v in right.items()))
    if args.pairs:
        rows, maps_on = two_objects(pipe, args.pairs, args.blend_res)
        print(f"two-object colour swaps ({args.pairs}), local blend on the shape word's {args.blend_res}x{args.blend_res} maps:")
        for name, rs in rows.items():
            two = [r for r in rs if "psnr_other" in r]
            print(f"  {name}: edit success {np.mean([r['success'] for r in rs]):.0%}, untouched object's PSNR "
                  f"{np.mean([r['psnr_other'] for r in two]):.1f} dB ({len(two)} of {len(rs)} sources show two objects)")
        for role, v in maps_on.items():
            a = np.array(v)
            print(f"  {role} word's map: {a[:, 0].mean():.2f} on its object, {a[:, 1].mean():.2f} on the other, "
                  f"{a[:, 2].mean():.2f} on the background ({len(a)} words)")


if __name__ == "__main__":
    main()
