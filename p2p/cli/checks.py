"""Checks of a command's arguments that need more than argparse: the --config file merged with the flags,
the edit's consistency, the image size against the model's VAE, a photo or saved inversion, the prompt's
words against the embedded model's vocabulary. They run before the model loads.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

from models.errors import UserError

from .args import rule_message


def is_embedded(model) -> bool:
    from p2p.files.loading import EMBEDDED_DIR

    path = Path(model)
    return (str(model) == "embedded" and not path.exists()) or path.resolve() == EMBEDDED_DIR


def warn_unknown_words(args, prompts) -> None:
    """One warning line when the embedded model is given words outside its caption grammar (it still runs)."""
    if not is_embedded(args.model):
        return
    from p2p.world.scenes import vocabulary

    known, unknown = set(vocabulary()), []
    for prompt in prompts:
        for word in re.findall(r"[\w'-]+|[^\w\s]", (prompt or "").lower()):
            if word not in known and word not in unknown:
                unknown.append(word)
    if unknown:
        print(f"p2p {args.command}: warning: the embedded model does not know {', '.join(map(repr, unknown))}: it "
              "knows only the words of its scene captions, and a prompt outside them makes a random scene; "
              "`p2p vocab` lists its words", file=sys.stderr)


def vae_factor(args) -> int | None:
    """The model's VAE downsampling factor when its config can be read without its weights, else None."""
    from p2p.files.loading import EMBEDDED_DIR

    path = EMBEDDED_DIR if is_embedded(args.model) else Path(args.model)
    try:
        if (path / "model.toml").is_file():
            from models.presets import load_toml

            return load_toml(path / "model.toml").vae_scale
        for sub in ("vae", "vqvae"):
            if (path / sub / "config.json").is_file():
                return 2 ** (len(json.loads((path / sub / "config.json").read_text())["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):  # a broken config: loading the model says what is wrong
        return None
    return None


def check_size(args, height, width) -> None:
    factor = vae_factor(args)
    for name, v in (("height", height), ("width", width)):
        if factor and v is not None and v % factor:
            lower, upper = v - v % factor, v - v % factor + factor
            raise UserError(f"--{name} {v} is not a multiple of {factor}, the model's VAE factor: use "
                            + (f"{lower} or {upper}" if lower else f"{upper}"))


def edit_settings(args, cfg=None, check: bool = True):
    """EditSettings from the config file (if any) with every flag given on the command line on top; with
    `cfg` (the model's config), site selections given by flags start from the model's defaults. Without
    it (before the model loads) the settings are also checked (`check_edit`) unless `check` is False."""
    from p2p.core.settings import EditSettings

    base = EditSettings.from_toml(args.edit_config).to_dict() if args.edit_config else {}
    flags = {"prompt": args.prompt, "targets": tuple(args.target) if args.target else None, "mode": args.mode,
             "cross_replace": args.cross_replace, "self_replace": args.self_replace,
             "blend": tuple(args.blend) if args.blend else None,
             "blend_subtract": tuple(args.blend_subtract) if args.blend_subtract else None,
             "blend_threshold": args.blend_threshold, "blend_start": args.blend_start,
             "reweight": dict(args.reweight) if args.reweight else None, "seed": args.seed, "steps": args.steps,
             "guidance": args.guidance, "height": args.height, "width": args.width, "eta": args.eta,
             "negative_prompt": args.negative_prompt, "low_memory": args.low_memory}
    flags = {k: v for k, v in flags.items() if v is not None}
    values = {**base, **flags}
    if values.get("prompt") is None:
        raise UserError("an edit needs --prompt (or a --config file that sets prompt)")
    for name in ("steps", "height", "width", "guidance", "eta", "seed", "blend_threshold", "blend_start"):
        problem = None if values.get(name) is None or name in flags else rule_message(name, values[name])
        if problem:
            raise UserError(f"{args.edit_config}: {name} {problem}")
    s = EditSettings.from_dict(values)
    sel = {kind: {k: getattr(args, f"{kind}_{k}") for k in ("res", "places", "blocks")
                  if getattr(args, f"{kind}_{k}") is not None} for kind in ("cross", "self")}
    if args.self_max_res is not None:
        sel["self"]["max_res"] = None if args.self_max_res == "all" else args.self_max_res
    for kind in ("cross", "self"):
        if sel[kind]:  # from the model's default selection once the model is read; the values are checked
            s = s.with_sites(kind, cfg, **sel[kind])
    if cfg is None and check:
        check_edit(s)
    return s


def check_edit(s) -> None:
    """What can be checked of an edit without the tokenizer (it checks the words once the model is read)."""
    from p2p.core.settings import check_windows

    if s.mode != "reweight" and not s.targets:
        raise UserError(f"mode {s.mode!r} needs an edited prompt: add --target P*, or reweight words of the prompt "
                        "itself with --mode reweight --reweight WORD=C")
    if s.mode == "reweight" and not s.reweight:
        raise UserError("mode 'reweight' needs the words to reweight: add --reweight WORD=C (e.g. striped=2)")
    check_windows(s)
    columns = len(s.prompts) - 1
    for word, c in s.reweight.items():
        values = list(c) if isinstance(c, (list, tuple)) else [c]
        shown = f"{word}={','.join(map(str, values))}"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise UserError(f"reweight {shown}: the values C must be finite numbers")
        if isinstance(c, (list, tuple)) and len(c) != columns:
            raise UserError(f"--reweight {shown} gives {len(c)} values for {columns} edited prompts: give one "
                            "--target and any number of values, or one value per --target")


def read_inverted(args):
    """The saved inversion of --inverted (its caption becomes --prompt unless given), or None. Everything that
    needs only the arguments is checked here, before the model loads: a photo given with --image is opened."""
    if args.inverted:
        from p2p.core.inversion import Inversion

        if args.image:
            raise UserError("give --image PHOTO (inverted now) or --inverted FILE (a saved inversion), not both")
        inverted = Inversion.load(args.inverted)
        if args.inversion and args.inversion != inverted.method:
            raise UserError(f"{args.inverted} is a {inverted.method} inversion; drop --inversion {args.inversion}")
        args.prompt = args.prompt or inverted.prompt
        return inverted
    if args.image:
        from p2p.files.images import open_image

        open_image(args.image)
    elif args.inversion:
        raise UserError("--inversion needs a photo to invert: add --image PHOTO (or --inverted FILE)")
    return None
