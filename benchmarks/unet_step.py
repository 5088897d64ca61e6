"""Our UNet step against diffusers' UNet2DConditionModel at the same config and weights, in one process.

    python benchmarks/unet_step.py                       # tiny and full SD v1, SD 2 and LDM configs, CPU, 32x32 latent
    python benchmarks/unet_step.py --presets tiny-ldm    # the LDM preset in miniature only (no full-size model)
    python benchmarks/unet_step.py --presets sd2         # SD 2.1 (768-v: per-level heads, linear projections)
    python benchmarks/unet_step.py --presets tiny-sdxl,sdxl --rounds 2 --repeats 1   # SDXL (10 GB of fp32 weights)
    python benchmarks/unet_step.py --device cuda --dtype float16 --latent 64

Prints the median time of a guided step (batch 2: [uncond | cond]) for both, and ours / diffusers
(goal: at or below 1.0). Runs alternate between the two models so that machine noise hits both.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.presets import PRESETS  # noqa: E402
from models.unet import UNet  # noqa: E402
from tests.tiny import reference_unet  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, device, repeats):
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def run(preset: str, latent: int, device, dtype, rounds: int, repeats: int, batch: int):
    cfg = PRESETS[preset].unet
    torch.manual_seed(0)
    ref = reference_unet(cfg)
    with torch.device("meta"):
        ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), assign=True)  # the same tensors: one copy of the weights in memory
    ref, ours = ref.to(device, dtype), ours.to(device, dtype)
    z = torch.randn(batch, cfg.in_channels, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(batch, 77, cfg.cross_attention_dim, device=device, dtype=dtype)
    added, kw = None, {}
    if cfg.addition_time_embed_dim:  # SDXL: the pooled text embedding and the size/crop numbers of a square image
        pooled = torch.randn(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                             device=device, dtype=dtype)
        sizes = torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]], device=device,
                             dtype=dtype).expand(batch, 6)
        added, kw = (pooled, sizes), {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": sizes}}
    with torch.inference_mode():
        err = (ours(z, 981, ctx, added=added).float()
               - ref(z, 981, encoder_hidden_states=ctx, **kw).sample.float()).abs().max().item()
        step_ours = lambda: ours(z, 981, ctx, added=added)  # noqa: E731
        step_ref = lambda: ref(z, 981, encoder_hidden_states=ctx, **kw)  # noqa: E731
        for f in (step_ours, step_ref):  # warm-up
            bench(f, device, 1)
        t_ours, t_ref = [], []
        for _ in range(rounds):
            t_ours.append(bench(step_ours, device, repeats))
            t_ref.append(bench(step_ref, device, repeats))
    a, b = statistics.median(t_ours), statistics.median(t_ref)
    print(f"{preset:8s} latent {latent:3d} batch {batch} {str(dtype)[6:]:8s} {device.type:4s} | ours {a * 1e3:9.2f} ms | "
          f"diffusers {b * 1e3:9.2f} ms | ours/diffusers {a / b:5.3f} | max abs diff {err:.2e}", flush=True)
    del ref, ours
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--presets", default="tiny,sd-v1,tiny-sd2,sd2,tiny-ldm,ldm,tiny-sdxl",
                   help="presets of models/presets.py, comma-separated")
    p.add_argument("--latent", type=int, default=32, help="latent side for the full-size presets: sd-v1 and sd2-base "
                   "(64 = 512 px, their native size), sd2 (96 = 768 px), sdxl (128 = 1024 px) and ldm (32 = 256 px, its native "
                   "size); the "
                   "tiny ones run at their own")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    for preset in args.presets.split(","):
        latent = PRESETS[preset].unet.sample_size if preset.startswith("tiny") else args.latent
        run(preset, latent, device, dtype, args.rounds, args.repeats, args.batch)


if __name__ == "__main__":
    main()
