"""The `p2p` command's arguments: the parser, and the checks each value gets as it is read.

Every flag is checked here, before any model loads: a number out of its range, a malformed window, an
unknown device is one line naming the flag, what it takes and what was given. `RULES` are the ranges of
the numeric settings, also applied to the values an edit settings file (--config) gives.
"""
from __future__ import annotations

import argparse
import math
import re

from models.errors import UserError
from models.presets import preset

STEPS_MAX = 1000  # the training timesteps of every model here: at most one DDIM step each
DEFAULT_HINT = "leave it out for the model's default"


class UsageError(UserError):
    """A command line argparse cannot read; `prog` is the (sub)command that says so."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`UsageError`, printed by main) instead of usage + exit."""

    def error(self, message):
        raise UsageError(self.prog, f"{message} (see {self.prog} --help)")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# name -> (test, what the value must be, hint). One table for flags and for --config values.
RULES = {
    "steps": (lambda v: _is_int(v) and 1 <= v <= STEPS_MAX,
              f"a whole number of DDIM steps from 1 to {STEPS_MAX}", DEFAULT_HINT),
    "height": (lambda v: _is_int(v) and v > 0, "a positive number of pixels, a multiple of the model's VAE factor "
               "(4 for the embedded model, 8 for SD v1)", DEFAULT_HINT),
    "width": (lambda v: _is_int(v) and v > 0, "a positive number of pixels, a multiple of the model's VAE factor "
              "(4 for the embedded model, 8 for SD v1)", DEFAULT_HINT),
    "guidance": (_is_number, f"a finite number (the embedded model's default is {preset('embedded').guidance:g}, "
                 "SD v1's 7.5; 1 or less: no guidance)", DEFAULT_HINT),
    "eta": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 (deterministic DDIM) to 1", ""),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2 ** 64, "a whole number from 0 to 2**64 - 1", ""),
    "blend_threshold": (lambda v: _is_number(v) and 0 <= v <= 1, "a number from 0 to 1 (default 0.3)", ""),
    "blend_start": (lambda v: _is_number(v) and 0 <= v <= 1, "a fraction of the steps from 0 to 1", ""),
    "n": (lambda v: _is_int(v) and v >= 1, "a positive number of scenes", ""),
    "inner_steps": (lambda v: _is_int(v) and v >= 1, "a positive number of Adam iterations per step",
                    "for no optimisation use --inversion ddim"),
    "early_stop": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0", ""),
    "res": (lambda v: _is_int(v) and v >= 1, "a positive side of an attention grid, e.g. 16", ""),
    "self_components": (lambda v: _is_int(v) and v >= 0, "a number of components (0: none)", ""),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "a positive number of prompts", ""),
}


def rule_message(name: str, value, shown: str | None = None) -> str | None:
    """None if `value` is allowed for the setting `name`, else what is wrong and what to give (`shown`:
    the value as the user wrote it)."""
    test, what, hint = RULES[name]
    if test(value):
        return None
    return f"must be {what}, got {shown or repr(value)}" + (f"; {hint}" if hint else "")


def checked(name: str, kind=int):
    """An argparse type: text -> int or float, checked against RULES[name]."""
    def parse(text: str):
        shown = text if text.strip() else repr(text)
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {RULES[name][1]}, got {shown}") from None
        problem = rule_message(name, value, shown)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = name
    return parse


def fraction_or_window(what: str):
    """An argparse type: "0.8" -> 0.8 (the window 0..0.8 of the steps); "0.2,0.6" -> (0.2, 0.6)."""
    def parse(text: str):
        from p2p.core.controller import as_window

        try:
            parts = [float(x) for x in text.split(",")]
        except ValueError:
            parts = None
        value = None if parts is None or len(parts) > 2 else parts[0] if len(parts) == 1 else tuple(parts)
        try:
            as_window(value, what)
        except UserError:
            raise argparse.ArgumentTypeError(f"must be a fraction of the steps in [0, 1] (e.g. 0.8) or a window "
                                             f"'start,end' with 0 <= start <= end <= 1 (e.g. 0.2,0.6), got {text}"
                                             ) from None
        return value
    parse.__name__ = what
    return parse


def cross_replace_arg(text: str):
    """"0.8", "0.2,0.6", or per word: "default_=1.0,lion=0.4"."""
    if "=" not in text:
        return fraction_or_window("--cross-replace")(text)
    out = {}
    for item in text.split(","):
        word, sep, value = item.partition("=")
        if not sep or not word.strip():
            raise argparse.ArgumentTypeError(f"per word it takes WORD=FRACTION,..., e.g. default_=1.0,lion=0.4; "
                                             f"got {text!r}")
        out[word.strip()] = fraction_or_window("--cross-replace")(value)
    return out


def reweight_arg(text: str) -> tuple[str, float | tuple]:
    """"snowy=2" -> ("snowy", 2.0); "snowy=-1,0,1" -> one value per column (the target repeated)."""
    word, sep, values = text.rpartition("=")
    try:
        numbers = [float(v) for v in values.split(",")] if sep and word.strip() else None
    except ValueError:
        numbers = None
    if not numbers or not all(math.isfinite(c) for c in numbers):
        raise argparse.ArgumentTypeError(f"takes WORD=C or WORD=C1,C2,... with finite numbers C (one image per "
                                         f"value), got {text!r}")
    return word.strip(), numbers[0] if len(numbers) == 1 else tuple(numbers)


def ints(text: str) -> tuple[int, ...]:
    """"16,8" -> (16, 8): non-negative whole numbers."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = None
    if values is None or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"takes whole numbers >= 0 separated by commas, e.g. 16,8; got {text!r}")
    return values


def pixel_pair(what: str, low: int):
    """An argparse type: "1024,768" -> (1024, 768), two whole numbers >= low (SDXL's sizes and crop)."""
    def parse(text: str) -> tuple[int, int]:
        try:
            values = tuple(int(x) for x in text.split(","))
        except ValueError:
            values = ()
        if len(values) != 2 or any(v < low for v in values):
            raise argparse.ArgumentTypeError(f"takes {what} in pixels, two whole numbers >= {low} separated by a "
                                             f"comma, e.g. {'0,256' if low == 0 else '1024,1024'}; got {text!r}")
        return values
    parse.__name__ = what
    return parse


def places(text: str) -> tuple[str, ...]:
    from p2p.core.sites import PLACES

    values = tuple(x.strip() for x in text.split(","))
    if not values or any(v not in PLACES for v in values):
        raise argparse.ArgumentTypeError(f"takes places among {','.join(PLACES)}, separated by commas; got {text!r}")
    return values


def eval_parts(text: str) -> tuple[str, ...]:
    from p2p.world.evaluate import PARTS

    values = tuple(x.strip() for x in text.split(","))
    if not values or any(v not in PARTS for v in values):
        raise argparse.ArgumentTypeError(f"takes parts among {','.join(PARTS)}, separated by commas; got {text!r}")
    return values


MEMORY_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
                "gib": 2**30, "tib": 2**40}


def memory_size(text: str) -> int:
    """"4GB" -> 4 * 10**9 bytes, "1.5GiB" -> 1.5 * 2**30, "500MB", "512MiB": a positive number and a unit."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)\s*", text, re.IGNORECASE)
    size = float(m[1]) * MEMORY_UNITS[m[2].lower()] if m and m[2].lower() in MEMORY_UNITS else 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"takes a memory size, a positive number with a unit among B, KB, MB, GB, "
                                         f"TB, KiB, MiB, GiB, TiB, e.g. 4GB or 1.5GiB; got {text!r}")
    return int(size)


def max_res(text: str) -> int | str:
    if text == "all":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a positive side N (layers whose attention grid is at most N x N) "
                                         f"or 'all', got {text!r}")
    return value


def device(text: str) -> str:
    """A device this torch can run on; the message lists those it has."""
    import torch

    have = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        have += ["cuda"] + ([f"cuda:{i}" for i in range(n)] if n > 1 else [])
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        have.append("mps")
    available = f"devices available here: {', '.join(have)}"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; p2p runs on cuda, mps or cpu ({available})")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"p2p runs on cuda, mps or cpu, not {text!r} ({available})")
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "a CUDA build that sees no GPU"
        raise argparse.ArgumentTypeError(f"{text!r}: this torch ({torch.__version__}) is {build}; {available} "
                                         "(use --device cpu, or install a CUDA build of torch on a machine "
                                         "with an NVIDIA GPU)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA devices; {available}")
    if dev.type == "mps" and "mps" not in have:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no Apple GPU (MPS); {available}")
    return text


# --- the parser ----------------------------------------------------------------------------------------

VOCAB_HINT = ("the default embedded model knows only the words of its scene captions, e.g. 'a big red striped "
              "square on a blue background': `p2p vocab` lists them")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="embedded", help="a diffusers folder (unet/, vae/, text_encoder/, tokenizer/), "
                   "a CompVis single-file checkpoint (.safetensors), or a native folder (model.toml); default "
                   "`embedded`: the small scene model shipped with p2p (64 px, runs on a CPU)")
    g.add_argument("--tokenizer", help="tokenizer for a single-file model: a tokenizer/ folder, a tokenizer.json, "
                   "or bpe_simple_vocab_16e6.txt.gz")
    g.add_argument("--model-config", help="preset a single-file model is read with (default: its family's, from its "
                   "keys; SD 2.x: sd2-base or sd2 as its name says 512 or 768)")
    g.add_argument("--variant", help="weights variant of a diffusers folder, e.g. fp16")
    g.add_argument("--no-ema", action="store_true", help="use the non-EMA UNet of a full-EMA single file")
    g.add_argument("--device", type=device, help="cuda, cuda:N, mps or cpu (default: the first available)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype to run in (default float16 on a GPU, float32 on the CPU)")
    g = p.add_argument_group("SDXL micro-conditioning (diffusers' original_size, crops_coords_top_left, target_size)")
    g.add_argument("--sdxl-original-size", type=pixel_pair("H,W", 1), metavar="H,W", help="the size the model is "
                   "told the image had before resizing (default: the image's size; smaller looks upscaled)")
    g.add_argument("--sdxl-crop", type=pixel_pair("TOP,LEFT", 0), metavar="TOP,LEFT", help="the top-left corner of "
                   "the crop the model is told was taken (default 0,0; other values cut the subject at the border)")
    g.add_argument("--sdxl-target-size", type=pixel_pair("H,W", 1), metavar="H,W",
                   help="the target size the model is told (default: the image's size)")


def add_steps_arg(g) -> None:
    g.add_argument("--steps", type=checked("steps"), help=f"DDIM steps, 1 to {STEPS_MAX} (default: the model's, 50 "
                   "for the embedded model and for SD v1)")


def add_guidance_arg(g, what: str = "classifier-free guidance scale w") -> None:
    g.add_argument("--guidance", type=checked("guidance", float), help=f"{what}, a finite number (default: the "
                   f"model's: {preset('embedded').guidance:g} for the embedded model, 7.5 for SD v1)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Flags default to None: unset means the model's default (or, for edits, the config file's)."""
    g = p.add_argument_group("generation")
    g.add_argument("--seed", type=checked("seed"), help="seed of the initial noise z_T (default 0)")
    add_steps_arg(g)
    add_guidance_arg(g)
    for side in ("height", "width"):
        g.add_argument(f"--{side}", type=checked(side), help=f"image {side} in pixels, a multiple of the model's VAE "
                       "factor (default: the model's: 64 for the embedded model, 512 for SD v1)")
    g.add_argument("--eta", type=checked("eta", float), help="DDIM eta from 0 to 1: 0 is deterministic (default 0)")
    g.add_argument("--negative-prompt", help="prompt of the unconditional branch (default empty)")
    g.add_argument("--low-memory", action="store_true", default=None,
                   help="run the two guidance branches one after the other")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_edit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("edit")
    g.add_argument("--config", dest="edit_config", help="an edit settings TOML (see configs/edits/); flags override it")
    g.add_argument("--prompt", help="the source prompt P (" + VOCAB_HINT + ")")
    g.add_argument("--target", action="append", help="an edited prompt P* (repeat for several edits in one batch)")
    g.add_argument("--mode", choices=["replace", "refine", "reweight"], help="word swap, added words, or fader "
                   "(reweight edits the prompt itself: no --target needed)")
    g.add_argument("--cross-replace", type=cross_replace_arg, help="fraction of steps with cross-attention injection "
                   "(default 0.8), a window 'a,b', or per word 'default_=1.0,lion=0.4'")
    g.add_argument("--self-replace", type=fraction_or_window("--self-replace"), help="fraction (or window 'a,b') of "
                   "steps with self-attention injection (default 0.4)")
    g.add_argument("--blend", nargs="+", help="local blend: words of the source and targets whose region is edited")
    g.add_argument("--blend-subtract", nargs="+", help="words cut out of the blend mask")
    g.add_argument("--blend-threshold", type=checked("blend_threshold", float),
                   help="local blend threshold k, 0 to 1 (default 0.3)")
    g.add_argument("--blend-start", type=checked("blend_start", float),
                   help="fraction of steps before blending starts (default 0)")
    g.add_argument("--reweight", type=reweight_arg, action="append", help="WORD=C: scale WORD's attention by C "
                   "(repeatable); WORD=C1,C2,... gives one image per value, of one --target (or, in mode "
                   "reweight, of the prompt itself)")
    g.add_argument("--cross-res", type=ints, help="inject cross-attention only at these native resolutions, e.g. 16,8")
    g.add_argument("--self-res", type=ints, help="inject self-attention only at these native resolutions")
    g.add_argument("--cross-places", type=places, help="down,mid,up subset for cross injection")
    g.add_argument("--self-places", type=places, help="down,mid,up subset for self injection")
    g.add_argument("--cross-blocks", type=ints, help="transformer block indices (0..15) for cross injection")
    g.add_argument("--self-blocks", type=ints, help="transformer block indices for self injection")
    g.add_argument("--self-max-res", type=max_res, metavar="N|all",
                   help="inject self-attention only on layers whose attention grid is at most N x N (default: the "
                   "model's, 16 for SD v1 as the authors: at most 16x16 keys); 'all': every layer")


def add_image_args(p: argparse.ArgumentParser, edit: bool) -> None:
    from p2p.core.inversion import METHODS

    g = p.add_argument_group("real image")
    g.add_argument("--image", required=not edit, help="a photo (PNG, JPEG, WebP, ...), centre-cropped to a square "
                   "and resized to the model's size; --prompt is its caption"
                   + (" (the edit's source)" if edit else ""))
    g.add_argument("--inversion", choices=METHODS, help="ddim (z_T only), null-text (Mokady et al., the authors'; "
                   "the default), negative-prompt (Miyake et al.) or direct (Ju et al.)")
    g.add_argument("--inner-steps", type=checked("inner_steps"), default=10,
                   help="null-text: Adam iterations per step (default 10)")
    g.add_argument("--early-stop", type=checked("early_stop", float), default=1e-5, help="null-text: a step stops "
                   "optimising when its loss is below this + 2e-5 * step (default 1e-5)")
    if edit:
        g.add_argument("--inverted", help="edit a saved inversion (`p2p invert --out FILE`) instead of --image; its "
                       "caption is the source prompt")


def build_parser() -> Parser:
    parser = Parser(prog="p2p", description="Prompt-to-Prompt image editing on Stable Diffusion v1, LDM and the "
                    "small embedded scene model (the default)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}

    def command(name, help, description=None):
        commands[name] = p = sub.add_parser(name, help=help, description=description or help)
        return p

    p = command("generate", "generate an image from a prompt",
                "generate an image from a prompt; " + VOCAB_HINT)
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt (" + VOCAB_HINT + ")")
    add_generation_args(p)
    p.add_argument("--out", required=True, help="output image: .png, .jpg or .webp (the settings are stored in "
                   "a PNG's or a JPEG's metadata)")

    p = command("edit", "Prompt-to-Prompt: edit the image of --prompt by editing the prompt",
                "Prompt-to-Prompt: edit the image of --prompt by editing the prompt; " + VOCAB_HINT)
    add_model_args(p)
    add_edit_args(p)
    add_generation_args(p)
    add_image_args(p, edit=True)
    p.add_argument("--out-dir", required=True, help="writes 0.png (source), 1.png, ... and grid.png (all at once "
                   "when the edit is done)")

    p = command("invert", "invert a photo with its caption (for editing it with p2p edit --inverted)")
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the photo's caption: the source prompt of its edits")
    add_image_args(p, edit=False)
    g = p.add_argument_group("sampling")
    add_steps_arg(g)
    add_guidance_arg(g, "guidance scale w the inversion is made for")
    p.add_argument("--out", required=True, help="the inversion, a .safetensors file")
    p.add_argument("--reconstruction", help="also write the image regenerated from the inversion (.png, .jpg or "
                   ".webp) and print its PSNR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("sweep", "a grid of edits over the values of one parameter (ablation figures)")
    add_model_args(p)
    add_edit_args(p)
    add_generation_args(p)
    p.add_argument("--param", required=True, help="cross_replace, self_replace, blend_threshold, reweight:WORD, "
                   "cross_res, self_res, ...")
    p.add_argument("--values", required=True, help="comma-separated values, e.g. 0,0.2,0.4; for windows or "
                   "resolution sets separate with ';', e.g. '64,32;16,8;16'")
    p.add_argument("--out", required=True, help="output image (.png, .jpg or .webp)")
    add_image_args(p, edit=True)

    p = command("attention", "per-token cross-attention maps of a generation (or of an edit)")
    add_model_args(p)
    add_edit_args(p)
    add_generation_args(p)
    p.add_argument("--res", type=checked("res"), help="native resolution of the maps averaged (default: the model's "
                   "local-blend level: 16 for SD v1 and SD 2.x-base, 24 for SD 2.x at 768 px, 32 for SDXL, 8 for the "
                   "embedded model, which has 16 and 8)")
    p.add_argument("--places", type=places, default=("up", "down"),
                   help="places averaged (default up,down, as the authors)")
    p.add_argument("--window", type=fraction_or_window("--window"),
                   help="fractions 'a,b' of the steps to average over, 0 <= a <= b <= 1 (default all)")
    p.add_argument("--self-components", type=checked("self_components"), default=0,
                   help="also write N self-attention components")
    p.add_argument("--out", required=True, help="output image (.png, .jpg or .webp)")
    add_image_args(p, edit=True)

    p = command("eval", "measure Prompt-to-Prompt on a scene model: text alignment, word swaps against the "
                "baseline, refinement, the fader, local blend, the VAE (p2p/world/evaluate.py)")
    add_model_args(p)
    p.add_argument("--n", "--cases", type=checked("n"), default=48, help="cases per row, at least 1 (default 48); "
                   "under torchrun write --cases (torchrun reads --n as short for its own --nnodes)")
    p.add_argument("--seed", type=checked("seed"), help="seed of the cases and of z_T (default 0)")
    p.add_argument("--parts", type=eval_parts, help="what to measure, separated by commas (default all: "
                   "plain,swaps,refine,fader,blend,vae)")
    add_steps_arg(p)
    p.add_argument("--out-dir", help="also write eval.json (per-case rows, summary, targets), eval.md and the "
                   "images of every row (examples/) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("run", "run an experiment file: a grid of edits with a results table, resumable, sharded "
                "over processes by torchrun (see configs/experiments/)")
    p.add_argument("experiment", help="an experiment TOML file (configs/experiments/)")
    p.add_argument("--out-dir", required=True, help="jobs/<id>/ per job, results.jsonl, summary.md, index.html; "
                   "a rerun skips the jobs already there")
    p.add_argument("--batch-size", type=checked("batch_size"), default=8,
                   help="prompts sampled together in one batch, jobs of one setup packed (default 8)")
    p.add_argument("--max-memory", type=memory_size, help="also bound each batch by this activation memory, "
                   "e.g. 4GB or 1.5GiB, estimated per prompt from the model's configuration (p2p/experiments/"
                   "batch.py: row_bytes); the batch is the smaller of the two limits")
    p.add_argument("--yes", action="store_true", help="run a grid of more than 10,000 jobs")
    p.add_argument("--device", type=device, help="cuda, cuda:N, mps or cpu (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype to run in (default float16 on a GPU, float32 on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("vocab", "the words the embedded model knows (its scene captions' grammar), by attribute")

    p = command("download", "download public weights listed in weights_manifest.json, verified")
    p.add_argument("name", nargs="?", help="model name (see --list)")
    p.add_argument("--dir", default="weights", help="where to put it (default ./weights)")
    p.add_argument("--list", action="store_true", help="list the known models")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("convert", "convert a model's PyTorch pickles (LDM's public files, .ckpt) or a single file "
                "(SDXL's) to a safetensors diffusers folder, running no pickled code")
    p.add_argument("src", help="a diffusers folder (LDM: unet/ vqvae/ bert/ tokenizer/; SD v1, 2.x: unet/ vae/ "
                   "text_encoder/ tokenizer/; SDXL: also text_encoder_2/ tokenizer_2/) or a single file "
                   "(model.ckpt, sd-v1-4.ckpt, v2-1_768-ema-pruned.ckpt, sd_xl_base_1.0.safetensors)")
    p.add_argument("dst", help="the folder to write (must not exist); written in full or not at all")
    p.add_argument("--tokenizer", help="tokenizer to include (required for a single file): LDM: a BERT uncased "
                   "vocab.txt or its tokenizer/ folder; SD v1, 2.x, XL: a tokenizer/ folder, tokenizer.json or "
                   "bpe_simple_vocab_16e6.txt.gz")
    p.add_argument("--model-config", help="preset a single file is read with (default: its family's, ldm, sd-v1 or "
                   "sdxl; SD 2.x: sd2-base or sd2 by its name)")
    p.add_argument("--no-ema", action="store_true", help="take the non-EMA UNet of a full-EMA single file")
    parser.commands = commands
    return parser
