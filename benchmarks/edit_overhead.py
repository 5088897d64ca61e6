"""What an edit costs: a Prompt-to-Prompt edit of one source and one target against plain generation of the
same two prompts (same batch, same steps), and against the authors' controllers on diffusers attention
processors (tests/reference_p2p.py), all on the same random weights, in one process.

    python benchmarks/edit_overhead.py                                  # full SD v1 config, 32x32 latent, CPU
    python benchmarks/edit_overhead.py --preset sd2 --latent 32         # SD 2.1 768-v config (v-prediction)
    python benchmarks/edit_overhead.py --preset sdxl --latent 32 --steps 3 --rounds 2 --warmup-steps 1   # SDXL, 13 GB
    python benchmarks/edit_overhead.py --device cuda --dtype float16 --latent 64 --steps 50
    python benchmarks/edit_overhead.py --device cuda --dtype bfloat16 --preset sdxl --latent 128 --steps 50

Prints the median wall time of each variant, the ratios (goal: edit / plain <= 1.15, edit / diffusers
processors < 1), and the peak memory of each variant above the weights (GPU: torch.cuda.max_memory_allocated
less the memory held before the run; CPU: the peak RSS, above the RSS before the run, of a child process that
builds the model and runs only that variant; the children run before the parent builds its own model, so that
two copies of SDXL's weights are never in memory together).

SDXL (`--preset sdxl`, `tiny-sdxl`) runs our pipeline only, on random weights of PyTorch's default init
(`Pipeline.from_config`): the authors' loop (tests/reference_p2p.py) is SD's, without SDXL's pooled vector and
time ids, so there are no diffusers variants to time. Its edit uses the family's defaults (models/sites.py:
self-attention injected on grids of at most 32x32 keys, the blend from the native 32x32 level), which at a
reduced latent select every layer for self-injection, as the SD v1 run at 32x32 does with its 16x16 cap.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.presets import PRESETS  # noqa: E402
from p2p.core.pipeline import Pipeline  # noqa: E402
from p2p.core.settings import EditSettings, build_controller  # noqa: E402
from tests import reference_p2p as R  # noqa: E402
from tests.conftest import openai_bpe_path, write_clip_vocab_dir  # noqa: E402
from tests.tiny import ours_from_reference, reference_pipeline  # noqa: E402

SOURCE, TARGET = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"
OURS, DIFFUSERS = ("plain", "edit", "edit+blend"), ("diffusers-plain", "diffusers-p2p")


def variants(preset: str) -> tuple[str, ...]:
    """What runs for a preset: ours, and the authors' loop on diffusers' processors where it applies (SD v1, 2.x)."""
    return OURS if PRESETS[preset].family == "sdxl" else OURS + DIFFUSERS


def build(args):
    torch.manual_seed(0)
    tok_dir = write_clip_vocab_dir(openai_bpe_path(), tempfile.mkdtemp())
    cfg = PRESETS[args.preset]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if cfg.family == "sdxl":  # ours only: built in place, one copy of the weights
        return Pipeline.from_config(cfg, tok_dir, device=device, dtype=dtype), None
    ref = reference_pipeline(tok_dir, cfg=cfg)
    ours = ours_from_reference(ref, cfg, tok_dir)
    for m in (ours.unet, ours.vae, ours.text_encoder):
        m.to(device, dtype)
    return ours, ref.to(device, dtype)


def runner(name, ours, ref, args, steps=None):
    """A function that runs the variant once (no VAE decoding: the denoising loop is what differs), for `steps`
    steps (default --steps)."""
    steps = steps or args.steps
    size = args.latent * ours.cfg.vae_scale
    s = EditSettings(SOURCE, targets=(TARGET,), steps=steps, blend=("squirrel", "lion") if "blend" in name else (),
                     height=size, width=size)
    cond, uncond = ours.encode_text(s.prompts), ours.encode_negative("")
    z_T = ours.initial_latent(0, size, size)
    w = ours.cfg.guidance  # 7.5 for SD, 5 for SDXL: the time does not depend on it
    if name == "plain":
        return lambda: ours.denoise(z_T, cond, uncond, steps=steps, guidance=w, progress=False)
    if name.startswith("edit"):
        return lambda: ours.denoise(z_T, cond, uncond, steps=steps, guidance=w, progress=False,
                                    controller=build_controller(s, ours.tokenizer, steps, model=ours.cfg))

    def reference():
        ctl = None if name == "diffusers-plain" else R.AttentionReplace(s.prompts, steps, 0.8, 0.4,
                                                                         tokenizer=ref.tokenizer)
        # the authors' loop, without the final decode
        with torch.no_grad():
            ids = ref.tokenizer(s.prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
            ctx = ref.text_encoder(ids.to(ref.device))[0]
            un = ref.text_encoder(ref.tokenizer([""] * 2, padding="max_length", max_length=77,
                                                return_tensors="pt").input_ids.to(ref.device))[0]
            context = torch.cat([un, ctx]).to(ref.unet.dtype)
            previous = R.register_attention_control(ref.unet, ctl or R._DummyController()) if ctl else None
            try:
                sched = R.DDIMScheduler(**R.SD_V1_DDIM, prediction_type=ours.cfg.ddim.prediction_type)
                sched.set_timesteps(steps)
                z = z_T.to(ref.device, ref.unet.dtype).expand(2, *z_T.shape[1:])
                for t in sched.timesteps:
                    z = R.diffusion_step(ref.unet, sched, ctl or R._DummyController(), z, context, t, w)
            finally:
                if previous is not None:
                    ref.unet.set_attn_processor(dict(previous))
        return z
    return reference


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_of(name, args, queue):
    """Child process: build, then run one variant once; report its peak RSS above the RSS before it, in MiB."""
    ours, ref = build(args)
    fn = runner(name, ours, ref, args)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current RSS (Linux)
    before = rss_kib("VmRSS")
    with torch.inference_mode():
        fn()
    queue.put((rss_kib("VmHWM") - before) / 1024)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd-v1", choices=[n for n in PRESETS if PRESETS[n].family != "ldm"],
                   help="a preset of models/presets.py (default sd-v1)")
    p.add_argument("--latent", type=int, default=32, help="latent side (default 32: 256 px for SD and SDXL)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory runs")
    p.add_argument("--warmup-steps", type=int, help="steps of each variant's warm-up run (default --steps; fewer "
                   "save time on a big model, though the injections start only at 2 steps, cross 0.8 and self 0.4 "
                   "of the steps rounded down: 3 steps inject cross-attention in 2, self-attention in 1)")
    args = p.parse_args()
    device = torch.device(args.device)
    names = variants(args.preset)
    memory = {}
    if device.type != "cuda" and not args.no_memory:  # before the parent holds a copy of the weights
        ctx = mp.get_context("spawn")
        for name in names:
            q = ctx.Queue()
            proc = ctx.Process(target=peak_of, args=(name, args, q))
            proc.start()
            proc.join()  # the queue holds one number: joining first cannot block
            if proc.exitcode != 0:
                sys.exit(f"the memory run of {name} failed (its error is above)")
            memory[name] = q.get()
    ours, ref = build(args)
    fns = {name: runner(name, ours, ref, args) for name in names}
    with torch.inference_mode():
        for name in names:
            runner(name, ours, ref, args, args.warmup_steps)()  # warm-up
        times = {name: [] for name in names}
        for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
            for name, f in fns.items():
                times[name].append(timed(f, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    if device.type == "cuda" and not args.no_memory:
        for name, f in fns.items():
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                f()
            memory[name] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    weights = sum(p.numel() * p.element_size() for m in (ours.unet, ours.vae, ours.text_encoder)
                  for p in m.parameters()) / 2 ** 30
    print(f"{args.preset}, latent {args.latent}x{args.latent}, 2 prompts, {args.steps} steps, {args.dtype}, {dev}, "
          f"weights {weights:.2f} GiB")
    for name in names:
        mem = f" | peak {memory[name]:8.0f} MiB above the weights" if name in memory else ""
        print(f"  {name:16s} {med[name]:8.3f} s{mem}")
    print(f"  edit / plain                       {med['edit'] / med['plain']:.3f}   (goal <= 1.15)")
    print(f"  edit+blend / plain                 {med['edit+blend'] / med['plain']:.3f}")
    if "diffusers-p2p" in med:
        print(f"  edit / diffusers-processor P2P     {med['edit'] / med['diffusers-p2p']:.3f}   (goal < 1)")
        print(f"  diffusers-processor P2P / its plain {med['diffusers-p2p'] / med['diffusers-plain']:.3f}")


if __name__ == "__main__":
    main()
