"""Command line: `p2p generate`, `p2p edit`, `p2p invert`, `p2p sweep`, `p2p attention`, `p2p download`,
`p2p convert`.

Errors a user can fix (a wrong path, a foreign checkpoint, a bad size) are printed as one line
naming the problem and the fix, with exit status 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from models.checkpoint import CheckpointError

from . import download as dl


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="embedded", help="a diffusers folder (unet/, vae/, text_encoder/, tokenizer/), "
                   "a CompVis single-file checkpoint (.safetensors), or a native folder (model.toml); default "
                   "`embedded`: the small scene model shipped with p2p (64 px, runs on a CPU)")
    g.add_argument("--tokenizer", help="tokenizer for a single-file model: a tokenizer/ folder, a tokenizer.json, "
                   "or bpe_simple_vocab_16e6.txt.gz")
    g.add_argument("--model-config", help="preset a single-file model is read with (default sd-v1)")
    g.add_argument("--variant", help="weights variant of a diffusers folder, e.g. fp16")
    g.add_argument("--no-ema", action="store_true", help="use the non-EMA UNet of a full-EMA single file")
    g.add_argument("--device", help="cuda, mps or cpu (default: the first available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype to run in (default float16 on a GPU, float32 on the CPU)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Flags default to None: unset means the model's default (or, for edits, the config file's)."""
    g = p.add_argument_group("generation")
    g.add_argument("--seed", type=int, help="seed of the initial noise z_T (default 0)")
    g.add_argument("--steps", type=int, help="DDIM steps (default: the model's, 50)")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale w (default: the model's, 7.5)")
    g.add_argument("--height", type=int, help="image height in pixels (default: the model's, 512)")
    g.add_argument("--width", type=int, help="image width in pixels (default: the model's, 512)")
    g.add_argument("--eta", type=float, help="DDIM eta: 0 is deterministic (default 0)")
    g.add_argument("--negative-prompt", help="prompt of the unconditional branch (default empty)")
    g.add_argument("--low-memory", action="store_true", default=None,
                   help="run the two guidance branches one after the other")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def load_pipeline(args):
    from .pipeline import Pipeline

    return Pipeline.from_pretrained(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                                    variant=args.variant, ema=not args.no_ema, config=args.model_config)


def generation_settings(args, pipe) -> dict:
    """Everything that fixes the image, resolved against the model's defaults (stored in the PNG)."""
    return {"model": str(args.model), "seed": args.seed or 0, "steps": args.steps or pipe.cfg.steps,
            "guidance": pipe.cfg.guidance if args.guidance is None else args.guidance,
            "height": args.height or pipe.cfg.image_size, "width": args.width or pipe.cfg.image_size,
            "eta": args.eta or 0.0, "negative_prompt": args.negative_prompt or "",
            "dtype": str(pipe.dtype).removeprefix("torch.")}


def cmd_generate(args) -> int:
    from .pipeline import save_png

    pipe = load_pipeline(args)
    s = generation_settings(args, pipe)
    t0 = time.perf_counter()
    (image,) = pipe.generate(args.prompt, seed=s["seed"], steps=s["steps"], guidance=s["guidance"],
                             height=s["height"], width=s["width"], eta=s["eta"],
                             negative_prompt=s["negative_prompt"], low_memory=bool(args.low_memory),
                             progress=not args.quiet)
    out = save_png(image, args.out, {"command": "generate", "prompt": args.prompt, **s})
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s on {pipe.device})")
    return 0


# --- edits -------------------------------------------------------------------------------------------

def number_or_window(text: str):
    """"0.8" -> 0.8; "0.2,0.6" -> (0.2, 0.6)."""
    parts = [float(x) for x in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def cross_replace_arg(text: str):
    """"0.8", "0.2,0.6", or per word: "default_=1.0,lion=0.4"."""
    if "=" not in text:
        return number_or_window(text)
    return {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(","))}


def reweight_arg(text: str) -> tuple[str, float | tuple]:
    """"snowy=2" -> ("snowy", 2.0); "snowy=-1,0,1" -> one value per target prompt."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--reweight takes WORD=C, got {text!r}")
    word, values = text.rsplit("=", 1)
    return word, number_or_window(values)


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def add_edit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("edit")
    g.add_argument("--config", dest="edit_config", help="an edit settings TOML (see configs/edits/); flags override it")
    g.add_argument("--prompt", help="the source prompt P")
    g.add_argument("--target", action="append", help="an edited prompt P* (repeat for several edits in one batch)")
    g.add_argument("--mode", choices=["replace", "refine", "reweight"], help="word swap, added words, or fader")
    g.add_argument("--cross-replace", type=cross_replace_arg, help="fraction of steps with cross-attention injection "
                   "(default 0.8), a window 'a,b', or per word 'default_=1.0,lion=0.4'")
    g.add_argument("--self-replace", type=number_or_window, help="fraction (or window) of steps with self-attention "
                   "injection (default 0.4)")
    g.add_argument("--blend", nargs="+", help="local blend: words of the source and targets whose region is edited")
    g.add_argument("--blend-subtract", nargs="+", help="words cut out of the blend mask")
    g.add_argument("--blend-threshold", type=float, help="local blend threshold k (default 0.3)")
    g.add_argument("--blend-start", type=float, help="fraction of steps before blending starts (default 0)")
    g.add_argument("--reweight", type=reweight_arg, action="append", help="WORD=C: scale WORD's attention by C "
                   "(repeatable; C1,C2,... gives one value per target)")
    g.add_argument("--cross-res", type=ints, help="inject cross-attention only at these native resolutions, e.g. 16,8")
    g.add_argument("--self-res", type=ints, help="inject self-attention only at these native resolutions")
    g.add_argument("--cross-places", type=lambda t: tuple(t.split(",")), help="down,mid,up subset for cross injection")
    g.add_argument("--self-places", type=lambda t: tuple(t.split(",")), help="down,mid,up subset for self injection")
    g.add_argument("--cross-blocks", type=ints, help="transformer block indices (0..15) for cross injection")
    g.add_argument("--self-blocks", type=ints, help="transformer block indices for self injection")
    g.add_argument("--self-max-keys", type=lambda t: math.inf if t == "all" else int(t),
                   help="inject self-attention only where keys <= N (default: the model's, 256 for SD v1 as the "
                   "authors; 'all': every layer)")


def edit_settings(args):
    """EditSettings from the config file (if any) with every flag given on the command line on top."""
    from dataclasses import replace

    from .controllers import SiteSelection
    from .edit import EditSettings

    base = EditSettings.from_toml(args.edit_config).to_dict() if args.edit_config else {}
    flags = {"prompt": args.prompt, "targets": tuple(args.target) if args.target else None, "mode": args.mode,
             "cross_replace": args.cross_replace, "self_replace": args.self_replace,
             "blend": tuple(args.blend) if args.blend else None,
             "blend_subtract": tuple(args.blend_subtract) if args.blend_subtract else None,
             "blend_threshold": args.blend_threshold, "blend_start": args.blend_start,
             "reweight": dict(args.reweight) if args.reweight else None, "seed": args.seed, "steps": args.steps,
             "guidance": args.guidance, "height": args.height, "width": args.width, "eta": args.eta,
             "negative_prompt": args.negative_prompt, "low_memory": args.low_memory}
    values = {**base, **{k: v for k, v in flags.items() if v is not None}}
    if "prompt" not in values:
        raise ValueError("an edit needs --prompt (or a --config file that sets prompt)")
    s = EditSettings.from_dict(values)
    for kind in ("cross", "self"):
        sel = {k: getattr(args, f"{kind}_{k}") for k in ("res", "places", "blocks")}
        if any(v is not None for v in sel.values()):
            cur = getattr(s, f"{kind}_sites")
            sel = {k: v for k, v in sel.items() if v is not None}
            s = replace(s, **{f"{kind}_sites": SiteSelection(**{**cur.__dict__, **sel})})
    if args.self_max_keys is not None:
        s = replace(s, self_max_keys=args.self_max_keys)
    return s


def cmd_edit(args) -> int:
    from .edit import run_edit, save_edit

    inverted = read_inverted(args)
    settings = edit_settings(args)
    pipe = load_pipeline(args)
    t0 = time.perf_counter()
    inversion, extra = inversion_of(args, pipe, settings, inverted)
    result = run_edit(pipe, settings, progress=not args.quiet, inversion=inversion)
    paths = save_edit(result, args.out_dir, {"model": str(args.model), **extra})
    print(f"wrote {len(paths)} images to {args.out_dir} ({time.perf_counter() - t0:.1f} s on {pipe.device})")
    return 0


# --- real images ---------------------------------------------------------------------------------------

def add_image_args(p: argparse.ArgumentParser, edit: bool) -> None:
    from .inversion import METHODS

    g = p.add_argument_group("real image")
    g.add_argument("--image", required=not edit, help="a photo (PNG, JPEG, WebP, ...), centre-cropped to a square "
                   "and resized to the model's size; --prompt is its caption" + (" (the edit's source)" if edit else ""))
    g.add_argument("--inversion", choices=METHODS, help="ddim (z_T only), null-text (Mokady et al., the authors'; "
                   "the default), negative-prompt (Miyake et al.) or direct (Ju et al.)")
    g.add_argument("--inner-steps", type=int, default=10, help="null-text: Adam iterations per step (default 10)")
    g.add_argument("--early-stop", type=float, default=1e-5, help="null-text: a step stops optimising when its loss "
                   "is below this + 2e-5 * step (default 1e-5)")
    if edit:
        g.add_argument("--inverted", help="edit a saved inversion (`p2p invert --out FILE`) instead of --image; its "
                       "caption is the source prompt")


def read_inverted(args):
    """The saved inversion of --inverted (its caption becomes --prompt unless given), or None. Everything that
    needs only the arguments is checked here, before the model loads: a photo given with --image is opened."""
    if args.inverted:
        from .inversion import Inversion

        if args.image:
            raise ValueError("give --image PHOTO (inverted now) or --inverted FILE (a saved inversion), not both")
        inverted = Inversion.load(args.inverted)
        if args.inversion and args.inversion != inverted.method:
            raise ValueError(f"{args.inverted} is a {inverted.method} inversion; drop --inversion {args.inversion}")
        args.prompt = args.prompt or inverted.prompt
        return inverted
    if args.image:
        from .images import open_image

        open_image(args.image)
    elif args.inversion:
        raise ValueError("--inversion needs a photo to invert: add --image PHOTO (or --inverted FILE)")
    return None


def invert_photo(args, pipe, prompt, steps, guidance):
    """`invert` with the photo and the inversion flags of the command line."""
    from .inversion import invert

    return invert(pipe, args.image, prompt, args.inversion or "null-text", steps=steps, guidance=guidance,
                  inner_steps=args.inner_steps, early_stop=args.early_stop, progress=not args.quiet)


def inversion_of(args, pipe, settings, inverted):
    """The inversion an edit starts from (None: a generated image) and what the PNGs record about it."""
    if inverted is not None:
        return inverted, {"inverted": str(args.inverted), "inversion": inverted.method}
    if not args.image:
        return None, {}
    inv = invert_photo(args, pipe, settings.prompt, settings.steps, settings.guidance)
    return inv, {"image": str(args.image), "inversion": inv.method}


def cmd_invert(args) -> int:
    from .images import open_image
    from .inversion import reconstruct

    open_image(args.image)  # an unreadable photo fails before the model loads
    pipe = load_pipeline(args)
    inv = invert_photo(args, pipe, args.prompt, args.steps, args.guidance)
    inv.info.update(image=str(args.image), model=str(args.model))
    out = inv.save(args.out)
    msg = (f"wrote {out}: {inv.method} inversion, {inv.steps} steps, guidance {inv.guidance} "
           f"({inv.info['seconds']:.1f} s on {pipe.device})")
    if args.reconstruction:
        from .images import load_image, psnr
        from .pipeline import save_png

        (image,) = pipe.decode(reconstruct(pipe, inv, progress=not args.quiet))
        save_png(image, args.reconstruction, {"command": "invert", "inverted": str(out), "prompt": inv.prompt,
                                              "inversion": inv.method, "model": str(args.model)})
        score = psnr(image, load_image(args.image, pipe.cfg.image_size))
        msg += f"; reconstruction {args.reconstruction}: PSNR {score:.2f} dB against the prepared photo"
    print(msg)
    return 0


def sweep_values(param: str, text: str) -> list:
    if param in ("cross_res", "self_res"):
        return [ints(group) for group in text.split(";")]
    return [number_or_window(v) for v in text.split(";")] if ";" in text else [float(v) for v in text.split(",")]


def cmd_sweep(args) -> int:
    from .edit import sweep
    from .pipeline import save_png

    inverted = read_inverted(args)
    settings = edit_settings(args)
    values = sweep_values(args.param, args.values)
    pipe = load_pipeline(args)
    inversion, extra = inversion_of(args, pipe, settings, inverted)
    sheet, _ = sweep(pipe, settings, args.param, values, progress=not args.quiet, inversion=inversion)
    out = save_png(sheet, args.out, {"command": "sweep", "param": args.param, "values": [str(v) for v in values],
                                     "model": str(args.model), **extra, **settings.to_dict()})
    print(f"wrote {out}")
    return 0


def cmd_attention(args) -> int:
    from .attention_maps import component_sheet, self_attention_components, token_maps, token_sheet
    from .controllers import AttentionStore, SiteSelection
    from .edit import grid, run_edit
    from .inversion import reconstruct
    from .pipeline import save_png

    inverted = read_inverted(args)
    pipe = load_pipeline(args)
    steps = args.steps or (inverted.steps if inverted else pipe.cfg.steps)
    window = tuple(int(float(x) * steps) for x in args.window.split(",")) if args.window else None
    kinds = ("cross", "self") if args.self_components else ("cross",)
    store = AttentionStore(SiteSelection(res=(args.res,)), kinds, max_queries=math.inf, steps=window)  # only what is shown
    places = tuple(args.places.split(","))
    extra = {}
    if args.target or args.image or inverted:
        settings = edit_settings(args)
        inversion, extra = inversion_of(args, pipe, settings, inverted)
        if args.target:
            result = run_edit(pipe, settings, store=store, progress=not args.quiet, inversion=inversion)
            prompts, images = settings.prompts, result.images
        else:  # a photo's own maps: those of its reconstruction
            inversion.settle(settings)  # refuses settings this inversion cannot honour
            prompts = [inversion.prompt]
            images = pipe.decode(reconstruct(pipe, inversion, controller=store, progress=not args.quiet))
    else:
        s = generation_settings(args, pipe)
        prompts = [args.prompt]
        images = pipe.generate(args.prompt, seed=s["seed"], steps=s["steps"], guidance=s["guidance"],
                               height=s["height"], width=s["width"], eta=s["eta"], controller=store,
                               negative_prompt=s["negative_prompt"], progress=not args.quiet)
    sheets = [token_sheet(img, token_maps(store, pipe.tokenizer, p, i, args.res, places))
              for i, (p, img) in enumerate(zip(prompts, images))]
    sheet = sheets[0] if len(sheets) == 1 else grid(sheets, prompts, rows=len(sheets))
    meta = {"command": "attention", "prompts": prompts, "res": args.res, "places": list(places),
            "model": str(args.model), "seed": args.seed or 0, **extra}
    out = save_png(sheet, args.out, meta)
    if args.self_components:
        comps = self_attention_components(store, args.res, places, 0, args.self_components)
        save_png(component_sheet(comps), out.with_name(out.stem + "-self.png"), meta)
    print(f"wrote {out}")
    return 0


def cmd_download(args) -> int:
    if args.list or not args.name:
        for name in dl.list_models():
            print(f"{name:28s} {dl.load_manifest()[name]['description']}")
        return 0
    path = dl.download(args.name, args.dir, progress=not args.quiet)
    print(f"downloaded {args.name} to {path}; use it with --model {path}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import evaluate, save

    pipe = load_pipeline(args)
    report = evaluate(pipe, n=args.n, seed=args.seed or 0, steps=args.steps, progress=not args.quiet,
                      examples=Path(args.out_dir) / "examples" if args.out_dir else None)
    print(report.table())
    if args.out_dir:
        save(report, Path(args.out_dir) / "eval.json")
        (Path(args.out_dir) / "eval.md").write_text(report.table() + "\n")
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    t0 = time.perf_counter()
    out = convert(args.src, args.dst, tokenizer=args.tokenizer, config=args.model_config, ema=not args.no_ema)
    print(f"wrote {out} (safetensors, {time.perf_counter() - t0:.1f} s); use it with --model {out}")
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

    p = sub.add_parser("edit", help="Prompt-to-Prompt: edit the image of --prompt by editing the prompt")
    add_model_args(p)
    add_edit_args(p)
    add_generation_args(p)
    add_image_args(p, edit=True)
    p.add_argument("--out-dir", required=True, help="writes 0.png (source), 1.png, ... and grid.png")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("invert", help="invert a photo with its caption (for editing it with p2p edit --inverted)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the photo's caption: the source prompt of its edits")
    add_image_args(p, edit=False)
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's, 50); edits use the same")
    p.add_argument("--guidance", type=float, help="guidance scale w the inversion is made for (default: the model's)")
    p.add_argument("--out", required=True, help="the inversion, a .safetensors file")
    p.add_argument("--reconstruction", help="also write the image regenerated from the inversion (PNG) and print "
                   "its PSNR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_invert)

    p = sub.add_parser("sweep", help="a grid of edits over the values of one parameter (ablation figures)")
    add_model_args(p)
    add_edit_args(p)
    add_generation_args(p)
    p.add_argument("--param", required=True, help="cross_replace, self_replace, blend_threshold, reweight:WORD, "
                   "cross_res, self_res, ...")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 0,0.2,0.4; for windows or "
                   "resolution sets separate with ';', e.g. '64,32;16,8;16'")
    p.add_argument("--out", required=True, help="output PNG")
    add_image_args(p, edit=True)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("attention", help="per-token cross-attention maps of a generation (or of an edit)")
    add_model_args(p)
    add_edit_args(p)
    add_generation_args(p)
    p.add_argument("--res", type=int, default=16, help="native resolution of the maps averaged (default 16)")
    p.add_argument("--places", default="up,down", help="places averaged (default up,down, as the authors)")
    p.add_argument("--window", help="fractions 'a,b' of the steps to average over (default all)")
    p.add_argument("--self-components", type=int, default=0, help="also write N self-attention components")
    p.add_argument("--out", required=True, help="output PNG")
    add_image_args(p, edit=True)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("eval", help="score P2P against plain generation on scene-model prompts (p2p/evaluate.py)")
    add_model_args(p)
    p.add_argument("--n", type=int, default=24, help="number of scenes (default 24)")
    p.add_argument("--seed", type=int, help="seed of the scenes and of z_T (default 0)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the model's)")
    p.add_argument("--out-dir", help="also write eval.json, eval.md and a grid per scene here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("download", help="download public weights listed in weights_manifest.json, verified")
    p.add_argument("name", nargs="?", help="model name (see --list)")
    p.add_argument("--dir", default="weights", help="where to put it (default ./weights)")
    p.add_argument("--list", action="store_true", help="list the known models")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("convert", help="convert a model's PyTorch pickles (LDM's public files, .ckpt) to a "
                       "safetensors diffusers folder, running no pickled code")
    p.add_argument("src", help="a diffusers folder (LDM: unet/ vqvae/ bert/ tokenizer/; SD v1: unet/ vae/ "
                   "text_encoder/ tokenizer/) or a CompVis single file (model.ckpt, sd-v1-4.ckpt)")
    p.add_argument("dst", help="the folder to write (must not exist); written in full or not at all")
    p.add_argument("--tokenizer", help="tokenizer to include (required for a single file): LDM: a BERT uncased "
                   "vocab.txt or its tokenizer/ folder; SD v1: a tokenizer/ folder, tokenizer.json or "
                   "bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--model-config", help="preset a single file is read with (default: its family's, ldm or sd-v1)")
    p.add_argument("--no-ema", action="store_true", help="take the non-EMA UNet of a full-EMA single file")
    p.set_defaults(func=cmd_convert)
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
