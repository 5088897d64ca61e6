"""What each `p2p` command does.

Every command checks first what needs only the arguments (flags, the --config file, output paths, a
photo or a saved inversion, the prompt's words), then loads the model, then computes, then writes: an
image through `save_image` (a temporary name renamed when complete), `edit`'s and `eval`'s several
files through a temporary sibling folder moved in at the end, so that an error or Ctrl-C leaves nothing
half-written.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

from models.errors import UserError

from p2p.files.output import check_output, save_image, staged_folder

from .args import rule_message
from .checks import check_edit, check_size, edit_settings, read_inverted, warn_unknown_words


SIZE_FLAGS = {"original_size": "--sdxl-original-size", "crops_coords_top_left": "--sdxl-crop",
              "target_size": "--sdxl-target-size"}


def load_pipeline(args):
    """The model of --model, with SDXL's size conditioning of the --sdxl-* flags (refused for another family)."""
    from models.families import family
    from p2p.core.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(args.model, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                                    variant=args.variant, ema=not args.no_ema, config=args.model_config)
    sizes = {k: getattr(args, flag[2:].replace("-", "_"), None) for k, flag in SIZE_FLAGS.items()}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if not sizes:
        return pipe
    if not pipe.micro_conditioned:
        raise UserError(f"{', '.join(SIZE_FLAGS[k] for k in sizes)}: only SDXL is conditioned on sizes and crops; "
                        f"{args.model} is a {family(pipe.cfg.family).title} model: leave them out")
    return pipe.with_size_conditioning(**sizes)


def size_meta(pipe) -> dict:
    """The SDXL size conditioning set (none: the image's own size), as the --sdxl-* flags name it, for metadata."""
    return {SIZE_FLAGS[k][2:].replace("-", "_"): v for k, v in pipe.size_conditioning.to_dict().items()}


# --- generate, edit, invert ----------------------------------------------------------------------------------

def generation_settings(args, pipe) -> dict:
    """Everything that fixes the image, resolved against the model's defaults (stored in the PNG)."""
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return {"model": str(args.model), "seed": pick(args.seed, 0), "steps": pick(args.steps, pipe.cfg.steps),
            "guidance": pick(args.guidance, pipe.cfg.guidance), "height": pick(args.height, pipe.cfg.image_size),
            "width": pick(args.width, pipe.cfg.image_size), "eta": pick(args.eta, 0.0),
            "negative_prompt": args.negative_prompt or "", "dtype": str(pipe.dtype).removeprefix("torch."),
            **size_meta(pipe)}


def cmd_generate(args) -> int:
    check_output(args.out)
    check_size(args, args.height, args.width)
    warn_unknown_words(args, [args.prompt, args.negative_prompt])
    pipe = load_pipeline(args)
    s = generation_settings(args, pipe)
    pipe.latent_shape(s["height"], s["width"])  # a size this model cannot take fails before sampling
    t0 = time.perf_counter()
    (image,) = pipe.generate(args.prompt, seed=s["seed"], steps=s["steps"], guidance=s["guidance"],
                             height=s["height"], width=s["width"], eta=s["eta"],
                             negative_prompt=s["negative_prompt"], low_memory=bool(args.low_memory),
                             progress=not args.quiet)
    out = save_image(image, args.out, {"command": "generate", "prompt": args.prompt, **s})
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s on {pipe.device})")
    return 0


def prepare_edit(args):
    """The checks of edit, sweep and attention before the model loads: -> (inverted, settings)."""
    inverted = read_inverted(args)
    settings = edit_settings(args)
    check_size(args, settings.height, settings.width)
    warn_unknown_words(args, [*settings.prompts, settings.negative_prompt])
    return inverted, settings


def invert_photo(args, pipe, prompt, steps, guidance):
    """`invert` with the photo and the inversion flags of the command line."""
    from p2p.core.inversion import invert

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


def cmd_edit(args) -> int:
    from p2p.core.run import run_edit, save_edit

    check_output(args.out_dir, folder=True)
    inverted, _ = prepare_edit(args)
    pipe = load_pipeline(args)
    settings = edit_settings(args, pipe.cfg)
    t0 = time.perf_counter()
    inversion, extra = inversion_of(args, pipe, settings, inverted)
    result = run_edit(pipe, settings, progress=not args.quiet, inversion=inversion)
    with staged_folder(args.out_dir) as tmp:  # 0.png, 1.png, ..., grid.png appear together or not at all
        paths = save_edit(result, tmp, {"model": str(args.model), **extra, **size_meta(pipe)})
    print(f"wrote {len(paths)} images to {args.out_dir} ({time.perf_counter() - t0:.1f} s on {pipe.device})")
    return 0


def cmd_invert(args) -> int:
    from p2p.core.inversion import reconstruct
    from p2p.files.images import load_image, open_image, psnr

    out = check_output(args.out, suffixes=(".safetensors",))
    if args.reconstruction:
        check_output(args.reconstruction, flag="--reconstruction")
    open_image(args.image)  # an unreadable photo fails before the model loads
    warn_unknown_words(args, [args.prompt])
    pipe = load_pipeline(args)
    inv = invert_photo(args, pipe, args.prompt, args.steps, args.guidance)
    inv.info.update(image=str(args.image), model=str(args.model))
    inv.save(out)  # whole or not at all
    msg = (f"wrote {out}: {inv.method} inversion, {inv.steps} steps, guidance {inv.guidance} "
           f"({inv.info['seconds']:.1f} s on {pipe.device})")
    if args.reconstruction:
        (image,) = pipe.decode(reconstruct(pipe, inv, progress=not args.quiet))
        save_image(image, args.reconstruction, {"command": "invert", "inverted": str(out), "prompt": inv.prompt,
                                                "inversion": inv.method, "model": str(args.model)})
        score = psnr(image, load_image(args.image, pipe.cfg.image_size))
        msg += f"; reconstruction {args.reconstruction}: PSNR {score:.2f} dB against the prepared photo"
    print(msg)
    return 0


# --- sheets: sweep, attention ----------------------------------------------------------------------------------

SWEEP_NUMBERS = ("blend_threshold", "blend_start", "guidance", "eta", "steps", "seed")
SWEEP_WINDOWS = ("cross_replace", "self_replace")
SWEEP_RES = ("cross_res", "self_res")


def sweep_values(param: str, text: str) -> list:
    """--values for --param, each checked: numbers "0,0.4,0.8"; windows "0,0.4;0.2,0.8"; sets "16,8;16"."""
    from p2p.core.controller import as_window

    if not (param in SWEEP_NUMBERS + SWEEP_WINDOWS + SWEEP_RES or param.startswith("reweight:") and param[9:]):
        raise UserError(f"--param {param!r} cannot be swept: use one of {', '.join(SWEEP_WINDOWS + SWEEP_NUMBERS)}, "
                        f"{', '.join(SWEEP_RES)} or reweight:WORD")
    try:
        if param in SWEEP_RES:
            values = [tuple(int(x) for x in group.split(",")) for group in text.split(";")]
        elif ";" in text:
            values = [tuple(float(x) for x in v.split(",")) if "," in v else float(v) for v in text.split(";")]
        else:
            values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--values {text!r}: give numbers separated by commas (e.g. 0,0.4,0.8), or windows and "
                        "resolution sets separated by ';' (e.g. '0,0.4;0.2,0.8' or '16,8;16')") from None
    for i, v in enumerate(values):
        if param in ("steps", "seed") and float(v).is_integer():
            values[i] = v = int(v)
        if param in SWEEP_WINDOWS:
            as_window(v, f"--values of {param}")
        elif param in SWEEP_NUMBERS:
            problem = rule_message(param, v)
            if problem:
                raise UserError(f"--values: {param} {problem}")
        elif param in SWEEP_RES:
            if not all(r >= 1 for r in v):
                raise UserError(f"--values: {param} takes positive sides (e.g. '16,8;16'), got {text!r}")
        elif not all(math.isfinite(c) for c in (v if isinstance(v, tuple) else (v,))):
            raise UserError(f"--values: the fader values C of {param} must be finite numbers, got {text!r}")
    return values


def with_value(settings, param: str, value):
    """The settings with one swept value, for the checks before the model loads (sites need the model)."""
    if param.startswith("reweight:"):
        return replace(settings, reweight={**settings.reweight, param[9:]: value})
    return settings if param in SWEEP_RES else replace(settings, **{param: value})


def cmd_sweep(args) -> int:
    from p2p.core.run import sweep

    check_output(args.out)
    inverted = read_inverted(args)
    settings = edit_settings(args, check=False)
    values = sweep_values(args.param, args.values)
    for v in values:
        check_edit(with_value(settings, args.param, v))
    check_size(args, settings.height, settings.width)
    warn_unknown_words(args, [*settings.prompts, settings.negative_prompt])
    pipe = load_pipeline(args)
    settings = edit_settings(args, pipe.cfg)
    inversion, extra = inversion_of(args, pipe, settings, inverted)
    sheet, _ = sweep(pipe, settings, args.param, values, progress=not args.quiet, inversion=inversion)
    out = save_image(sheet, args.out, {"command": "sweep", "param": args.param, "values": [str(v) for v in values],
                                       "model": str(args.model), **extra, **settings.to_dict(), **size_meta(pipe)})
    print(f"wrote {out}")
    return 0


def check_maps(args, pipe, steps: int) -> int:
    """-> the res of the maps: --res, else the model's local-blend level (p2p/core/sites.py: 16 for SD v1 and SD 2.x
    at 512 px, 24 for SD 2.x at 768, 32 for SDXL at 1024, 8 for the embedded model), the maps the authors show and
    blend from (16 for SD v1 and LDM in their notebooks). Refuses a res the model has no cross-attention maps at in
    --places, and a --window that covers no step."""
    from p2p.core.controller import step_range
    from p2p.core.sites import p2p_defaults

    res = p2p_defaults(pipe.cfg).blend_res if args.res is None else args.res
    have = sorted({s.res for s in pipe.unet.sites if s.kind == "cross" and s.place in args.places}, reverse=True)
    if res not in have:
        given = f"--res {res}" if args.res is not None else f"the model's default --res {res}"
        raise UserError(f"{given}: this model's cross-attention maps in {','.join(args.places)} are at res "
                        f"{', '.join(map(str, have)) or 'none'}; give one of them (--res {have[0] if have else 'N'})")
    if args.window is not None:
        lo, hi = step_range(args.window, steps)
        if lo >= hi:
            raise UserError(f"--window {args.window} covers none of the {steps} steps; widen it")
    return res


def cmd_attention(args) -> int:
    from p2p.core.attention_maps import component_sheet, self_attention_components, token_maps, token_sheet
    from p2p.core.inversion import reconstruct
    from p2p.core.run import run_edit
    from p2p.core.sites import SiteSelection
    from p2p.core.store import AttentionStore
    from p2p.files.output import grid

    out = check_output(args.out)
    self_out = out.with_name(f"{out.stem}-self{out.suffix}")
    if args.self_components:
        check_output(self_out, flag="the self-attention sheet")
    inverted = read_inverted(args)
    editing = bool(args.target or args.mode or args.reweight or args.edit_config)
    settings = None
    if editing or args.image or inverted:
        settings = edit_settings(args, check=editing)
        prompts = [*settings.prompts, settings.negative_prompt]
        check_size(args, settings.height, settings.width)
    elif args.prompt is None:
        raise UserError("attention needs --prompt: the prompt whose maps are shown")
    else:
        prompts = [args.prompt, args.negative_prompt]
        check_size(args, args.height, args.width)
    warn_unknown_words(args, prompts)
    pipe = load_pipeline(args)
    steps = inverted.steps if inverted else (settings.steps if settings else None) or args.steps or pipe.cfg.steps
    res = check_maps(args, pipe, steps)
    kinds = ("cross", "self") if args.self_components else ("cross",)
    sites = SiteSelection(kinds=kinds, places=args.places, res=(res,))
    store = AttentionStore(sites, window=args.window)  # only what is shown
    extra = {}
    if settings is not None:
        settings = edit_settings(args, pipe.cfg)
        inversion, extra = inversion_of(args, pipe, settings, inverted)
        if editing:
            result = run_edit(pipe, settings, controller=store, progress=not args.quiet, inversion=inversion)
            prompts, images = settings.prompts, result.images
        else:  # a photo's own maps: those of its reconstruction
            inversion.settle(settings)  # refuses settings this inversion cannot honour
            prompts = [inversion.prompt]
            images = pipe.decode(reconstruct(pipe, inversion, controller=store, progress=not args.quiet))
    else:
        s = generation_settings(args, pipe)
        pipe.latent_shape(s["height"], s["width"])
        prompts = [args.prompt]
        images = pipe.generate(args.prompt, seed=s["seed"], steps=s["steps"], guidance=s["guidance"],
                               height=s["height"], width=s["width"], eta=s["eta"], controller=store,
                               negative_prompt=s["negative_prompt"], progress=not args.quiet)
    sheets = [token_sheet(img, token_maps(store, pipe.tokenizer, p, i, sites))
              for i, (p, img) in enumerate(zip(prompts, images))]
    sheet = sheets[0] if len(sheets) == 1 else grid(sheets, prompts, rows=len(sheets))
    components = (component_sheet(self_attention_components(store, sites, 0, args.self_components))
                  if args.self_components else None)
    meta = {"command": "attention", "prompts": prompts, "res": res, "places": list(args.places),
            "model": str(args.model), "seed": args.seed or 0, **extra, **size_meta(pipe)}
    save_image(sheet, out, meta)
    if components is not None:
        save_image(components, self_out, meta)
    print(f"wrote {out}")
    return 0


# --- eval, vocab, download, convert ------------------------------------------------------------------------

def cmd_eval(args) -> int:
    """The evaluation as an experiment (p2p/world/evaluate.py: experiment_text): its jobs run by the experiment
    runner, resumably in --out-dir (else a temporary folder), sharded under torchrun; rank 0 then makes the
    rows and tables from results.jsonl. Each job runs alone, as `evaluate` runs it, so the numbers are its."""
    import json
    import tempfile
    from contextlib import nullcontext
    from pathlib import Path

    from p2p.experiments.dist import Ranks
    from p2p.experiments.measures import MEASURES
    from p2p.experiments.runner import run_experiment, write_text
    from p2p.experiments.spec import read_experiment
    from p2p.files.images import open_image
    from p2p.world.evaluate import PARTS, aggregate, eval_rows, experiment_text, save_example
    from p2p.world.judge import SIZE
    from p2p.world.report import save, tables

    if args.out_dir:
        check_output(args.out_dir, folder=True)
    ranks = Ranks.from_env()
    try:
        if ranks.world > 1 and not args.out_dir:
            raise UserError("p2p eval under torchrun needs --out-dir, a folder every process shares")
        args.device = ranks.device(args.device)
        pipe = load_pipeline(args)
        if pipe.cfg.image_size != SIZE:
            raise UserError(f"p2p eval measures models of the scene generator's {SIZE} px images (p2p/world/judge.py "
                            f"reads them); {args.model} makes {pipe.cfg.image_size} px images")
        parts = args.parts or PARTS
        meta = {"model": str(args.model), "n": args.n, "seed": args.seed or 0, "steps": args.steps or pipe.cfg.steps,
                "parts": list(parts)}
        t0 = time.perf_counter()
        with nullcontext(args.out_dir) if args.out_dir else tempfile.TemporaryDirectory(prefix="p2p-eval-") as out:
            out = Path(out)
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "experiment.toml", experiment_text(args.n, args.seed or 0, parts, args.steps,
                                                                str(args.model), args.tokenizer))
            exp = read_experiment(out / "experiment.toml", known_measures=tuple(MEASURES))
            run_experiment(exp, pipe, out, batch_size=1, ranks=ranks, progress=not args.quiet)
            if not ranks.main:
                return 0
            rows = eval_rows([json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()])
            summary = aggregate(rows)
            if args.out_dir:
                for row in rows:  # one sheet per row: source, edit, ...
                    save_example(row, [open_image(out / p) for p in row["images"]], out / "examples")
                save(rows, summary, out, **meta, seconds=round(time.perf_counter() - t0, 1))
    finally:
        ranks.close()
    print(tables(summary))
    print(f"{args.n} cases per row, {meta['steps']} steps, {time.perf_counter() - t0:.0f} s")
    return 0


def cmd_run(args) -> int:
    from p2p.core.pipeline import Pipeline
    from p2p.experiments.dist import Ranks
    from p2p.experiments.measures import MEASURES, check_measures
    from p2p.experiments.runner import run_experiment
    from p2p.experiments.spec import read_experiment

    check_output(args.out_dir, folder=True)
    exp = read_experiment(args.experiment, yes=args.yes, known_measures=tuple(MEASURES))  # before any model
    check_measures(exp.measures, exp.model)
    ranks = Ranks.from_env()
    try:
        pipe = Pipeline.from_pretrained(exp.model, tokenizer=exp.tokenizer, device=ranks.device(args.device),
                                        dtype=args.dtype)
        stats = run_experiment(exp, pipe, args.out_dir, batch_size=args.batch_size, max_memory=args.max_memory,
                               ranks=ranks, progress=not args.quiet)
    finally:
        ranks.close()
    if ranks.main:
        print(f"{stats.jobs} jobs: {stats.done_before} done before, {stats.ran} run here"
              + (f" (rank 0 of {ranks.world})" if ranks.world > 1 else "")
              + f", {stats.seconds:.1f} s; wrote {stats.out_dir}/results.jsonl, summary.md, index.html")
    return 0


def cmd_vocab(args) -> int:
    from p2p.world import scenes

    groups = [("size", scenes.SIZES), ("colour", tuple(scenes.COLOURS)),
              ("pattern", tuple(p for p in scenes.PATTERNS if p != "plain")), ("shape", scenes.SHAPES)]
    listed = {w for _, words in groups for w in words}
    groups.append(("other", tuple(w for w in scenes.vocabulary() if w not in listed)))
    print("The embedded model knows the words of its scene captions (p2p/world/scenes.py):\n"
          "  a {size} {colour} [{pattern}] {shape} [and a {size} {colour} [{pattern}] {shape}] "
          "on a {colour} background\n"
          "e.g. 'a big red striped square and a small blue circle on a green background'\n")
    notes = {"colour": "  (objects and backgrounds)", "pattern": "  (plain: no pattern word)"}
    for name, words in groups:
        print(f"{name:8s} {' '.join(words)}{notes.get(name, '')}")
    return 0


def cmd_download(args) -> int:
    from p2p.files import download as dl

    if args.list or not args.name:
        for name in dl.list_models():
            print(f"{name:28s} {dl.load_manifest()[name]['description']}")
        return 0
    path = dl.download(args.name, args.dir, progress=not args.quiet)
    print(f"downloaded {args.name} to {path}; use it with --model {path}")
    return 0


def cmd_convert(args) -> int:
    from p2p.files.convert import convert

    t0 = time.perf_counter()
    out = convert(args.src, args.dst, tokenizer=args.tokenizer, config=args.model_config, ema=not args.no_ema)
    print(f"wrote {out} (safetensors, {time.perf_counter() - t0:.1f} s); use it with --model {out}")
    return 0


COMMANDS = {"generate": cmd_generate, "edit": cmd_edit, "invert": cmd_invert, "sweep": cmd_sweep,
            "attention": cmd_attention, "eval": cmd_eval, "vocab": cmd_vocab, "download": cmd_download,
            "convert": cmd_convert, "run": cmd_run}
