"""Command line: `p2p generate`, `p2p download`.

Errors a user can fix (a wrong path, a foreign checkpoint, a bad size) are printed as one line
naming the problem and the fix, with exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from models.checkpoint import CheckpointError

from . import download as dl


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) "
                   "or a CompVis single-file checkpoint (.safetensors)")
    g.add_argument("--tokenizer", help="tokenizer for a single-file model: a tokenizer/ folder, a tokenizer.json, "
                   "or bpe_simple_vocab_16e6.txt.gz")
    g.add_argument("--config", help="preset a single-file model is read with (default sd-v1)")
    g.add_argument("--variant", help="weights variant of a diffusers folder, e.g. fp16")
    g.add_argument("--no-ema", action="store_true", help="use the non-EMA UNet of a full-EMA single file")
    g.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype to run in (default float16 on a GPU, float32 on the CPU)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial noise z_T (default 0)")
    g.add_argument("--steps", type=int, help="DDIM steps (default: the model's, 50)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale w (default: the model's, 7.5)")
    g.add_argument("--height", type=int, help="image height in pixels (default: the model's, 512)")
    g.add_argument("--width", type=int, help="image width in pixels (default: the model's, 512)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 is deterministic (default 0)")
    g.add_argument("--negative-prompt", default="", help="prompt of the unconditional branch (default empty)")
    g.add_argument("--low-memory", action="store_true", help="run the two guidance branches one after the other")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def load_pipeline(args):
    from .pipeline import Pipeline

    return Pipeline.from_pretrained(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                                    variant=args.variant, ema=not args.no_ema, config=args.config)


def generation_settings(args, pipe) -> dict:
    """Everything that fixes the image, resolved against the model's defaults (stored in the PNG)."""
    return {"model": str(args.model), "seed": args.seed, "steps": args.steps or pipe.cfg.steps,
            "guidance": pipe.cfg.guidance if args.guidance is None else args.guidance,
            "height": args.height or pipe.cfg.image_size, "width": args.width or pipe.cfg.image_size,
            "eta": args.eta, "negative_prompt": args.negative_prompt, "dtype": str(pipe.dtype).removeprefix("torch.")}


def cmd_generate(args) -> int:
    from .pipeline import save_png

    pipe = load_pipeline(args)
    s = generation_settings(args, pipe)
    t0 = time.perf_counter()
    (image,) = pipe.generate(args.prompt, seed=s["seed"], steps=s["steps"], guidance=s["guidance"],
                             height=s["height"], width=s["width"], eta=s["eta"],
                             negative_prompt=s["negative_prompt"], low_memory=args.low_memory,
                             progress=not args.quiet)
    out = save_png(image, args.out, {"command": "generate", "prompt": args.prompt, **s})
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s on {pipe.device})")
    return 0


def cmd_download(args) -> int:
    if args.list or not args.name:
        for name in dl.list_models():
            print(f"{name:28s} {dl.load_manifest()[name]['description']}")
        return 0
    path = dl.download(args.name, args.dir, progress=not args.quiet)
    print(f"downloaded {args.name} to {path}; use it with --model {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="p2p", description="Prompt-to-Prompt image editing on Stable Diffusion v1")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate an image from a prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    add_generation_args(p)
    p.add_argument("--out", required=True, help="output PNG (the settings are stored in its metadata)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("download", help="download public weights listed in weights_manifest.json, verified")
    p.add_argument("name", nargs="?", help="model name (see --list)")
    p.add_argument("--dir", default="weights", help="where to put it (default ./weights)")
    p.add_argument("--list", action="store_true", help="list the known models")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, FileNotFoundError, KeyError, dl.DownloadError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"p2p {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
