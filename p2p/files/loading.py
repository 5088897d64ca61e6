"""Find, identify and read a model on disk: a diffusers folder or a CompVis single file, of either family.

`read_model(path)` returns the model's `ModelConfig`, the state dicts of its three networks in our
names, and where its tokenizer is. It tells the family from the files (model_index.json or the
sub-folders of a folder and the UNet's projections, the text encoder's keys of a single file;
models/families.py says what differs), and refuses, with a message that says what the file is,
checkpoints of other models (SDXL, inpainting UNets). LDM's public weights are PyTorch pickles: the runtime reads LDM
from safetensors only and asks for `p2p convert` (p2p/files/convert.py) once; SD v1 pickles are read as they
always were, with `torch.load(weights_only=True)`, which runs no code.
"""
from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

from models.checkpoint import (CheckpointError, IGNORED_KEYS, read_json, read_tensors, split_prefix,
                               unet_from_compvis, vae_from_compvis, vae_from_diffusers)
from models.errors import MissingFileError
from models.families import FAMILIES, Family, family
from models.presets import ModelConfig, load_toml, preset, unet_config_from_diffusers, vae_config_from_diffusers

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPEN_CLIP_TELL = "cond_stage_model.model.token_embedding.weight"  # SD 2.x: OpenCLIP's text tower
SD_V1_TELL = UNET + "output_blocks.11.0.skip_connection.weight"  # diffusers' own test for an SD v1 file
CROSS_K = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SDXL_TELL = "conditioner.embedders.1.model.positional_embedding"  # bigG as sgm's second embedder (sd2-sdxl.md §4.2)
NATIVE_CONFIG, NATIVE_WEIGHTS = "model.toml", "model.safetensors"
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "embedded"  # the model trained by p2p.world.train, shipped with p2p
LDM_TELL = TEXT + "attn_layers."  # LDM's x-transformers text encoder (SD v1: cond_stage_model.transformer.text_model.)
WEIGHT_STEMS = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                "text": ("model", "pytorch_model"), "text_2": ("model", "pytorch_model")}  # file names in a diffusers folder, before the extension


def read_model(path: str | Path, *, variant: str | None = None, ema: bool = True,
               config: str | ModelConfig | None = None, pickles: bool | None = None):
    """-> (ModelConfig, {"unet": sd, "vae": sd, "text": sd}, tokenizer folder or None).

    `config` names the preset a single file is read with (default: the detected family's). `pickles`:
    None reads PyTorch pickles where the family's runtime does (SD v1), True always (`p2p convert`).
    """
    path = EMBEDDED_DIR if str(path) == "embedded" and not Path(path).exists() else Path(path)
    if path.is_dir():
        read = read_native(path) if (path / NATIVE_CONFIG).is_file() else read_folder(path, variant, pickles)
        check_folder_config(path, read[0], config)
        return read
    if path.is_file():
        return (*read_single_file(path, config, ema, pickles), None)
    raise MissingFileError(f"model not found: {path} (give a diffusers folder (SD v1: unet/ vae/ text_encoder/ "
                           "tokenizer/; LDM: unet/ vqvae/ bert/ tokenizer/), a single .safetensors checkpoint "
                           "(`p2p download` fetches them), or `embedded` for the small model shipped with p2p)")


def check_folder_config(path: Path, cfg: ModelConfig, config: str | ModelConfig | None) -> None:
    """A folder states its own config, which is what it is read with; a --model-config of another family is a
    mistake about what the folder holds, so it is refused rather than ignored."""
    if config is None:
        return
    given = preset(config) if isinstance(config, str) else config
    if given.family != cfg.family:
        name = config if isinstance(config, str) else f"a {given.family!r} config"
        raise CheckpointError(f"{path} is a {FAMILIES[cfg.family].title} model folder, read with its own config, "
                              f"but --model-config {name} is {FAMILIES[given.family].title}: leave out --model-config "
                              "(it is for single files)")


# --- native folders: what p2p.world.train exports, e.g. the embedded default model --------------------------

def read_native(path: Path):
    """A native model folder: model.toml (a ModelConfig), model.safetensors (the three networks under the
    prefixes unet. vae. text.), tokenizer/ (vocab.json + merges.txt, or a WordPiece vocab.txt)."""
    try:
        cfg = load_toml(path / NATIVE_CONFIG)
    except (ValueError, TypeError, tomllib.TOMLDecodeError) as e:
        raise CheckpointError(f"{path / NATIVE_CONFIG} is not a valid model config: {e}") from e
    sd = read_tensors(path / NATIVE_WEIGHTS)
    sds = {part: split_prefix(sd, part + ".") for part in ("unet", "vae", "text")}
    stray = sorted(k for k in sd if not k.startswith(("unet.", "vae.", "text.")))
    empty = [part + ".*" for part, v in sds.items() if not v]
    problems = ([f"no {', '.join(empty)} tensors"] if empty else []) + \
               ([f"keys outside unet./vae./text.: {', '.join(stray[:5])}"] if stray else [])
    if problems:
        raise CheckpointError(f"{path / NATIVE_WEIGHTS} is not a native p2p weights file: {'; '.join(problems)}")
    tok = path / "tokenizer"
    return cfg, sds, tok if tok.is_dir() else None


def needs_conversion(path: Path, pickles: list[Path], fam: Family) -> CheckpointError:
    names = ", ".join(str(p.relative_to(path) if p != path else p.name) for p in pickles)
    dst = path.with_name(path.stem + "-safetensors")
    return CheckpointError(f"{path} holds PyTorch pickles ({names}); {fam.title} weights are read from safetensors "
                           f"only. Convert them once (no code is unpickled): p2p convert {path} {dst}"
                           f"{' --tokenizer VOCAB' if path.is_file() else ''}, then use --model {dst}")


# --- diffusers folders -----------------------------------------------------------------------------

def weights_file(folder: Path, stems: tuple[str, ...], variant: str | None) -> Path:
    """The weights of one component folder: the requested variant, else fp32 (else fp16); safetensors first."""
    order = [variant, None] if variant else [None, "fp16"]
    candidates = [folder / f"{stem}{'.' + v if v else ''}.{ext}" for ext in ("safetensors", "bin")
                  for v in order for stem in stems]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(c.name for c in candidates)}")


def grouped(key) -> dict[str, list[str]]:
    """Family titles grouped by `key(family)` (SD v1 and SD 2.x share a pipeline class and a layout), for messages."""
    out: dict[str, list[str]] = {}
    for f in FAMILIES.values():
        out.setdefault(key(f), []).append(f.title)
    return out


def folder_family(path: Path) -> Family:
    """The family of a diffusers folder: from model_index.json, else from the sub-folders it has."""
    index = path / "model_index.json"
    found = []
    if index.is_file():
        name = read_json(index).get("_class_name")
        found = [f.name for f in FAMILIES.values() if f.pipeline_class == name]
        if name and not found:
            runs = grouped(lambda f: f.pipeline_class)
            raise CheckpointError(f"{path} holds a diffusers {name}; this project runs "
                                  + " and ".join(f"{k} ({', '.join(titles)})" for k, titles in runs.items())
                                  + " folders")
    if not found:
        own = {f.name: [d for p, d in f.folders.items() if p != "unet" and (path / d).is_dir()]
               for f in FAMILIES.values()}
        found = [name for name, dirs in own.items() if dirs]
    if len(found) > 1:  # SDXL: the only one with text_encoder_2/
        found = [n for n in found if all((path / d).is_dir() for d in FAMILIES[n].folders.values())] or found
    if len(found) > 1:  # SD v1 and SD 2.x share a pipeline class and a layout: the UNet's projections differ
        unet_json = path / "unet" / "config.json"
        linear = bool(read_json(unet_json).get("use_linear_projection", False)) if unet_json.is_file() else False
        found = [name for name in found if FAMILIES[name].linear_projection == linear] or found
    if len(found) == 1:
        return FAMILIES[found[0]]
    layouts = " or ".join(f"a {' or '.join(titles)} folder ({k}, tokenizer/)" for k, titles in
                          grouped(lambda f: ", ".join(d + "/" for d in f.folders.values())).items())
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    raise CheckpointError(f"cannot tell which model {path} holds: expected {layouts}; it holds "
                          f"{', '.join(names[:12]) or 'nothing'}")


def read_folder(path: Path, variant: str | None, pickles: bool | None = None):
    fam = folder_family(path)
    sub = {part: path / d for part, d in fam.folders.items()}
    missing = [d + "/" for d in fam.folders.values() if not (path / d).is_dir()]
    if missing:
        raise CheckpointError(f"{path} is not a diffusers {fam.title} folder: missing {', '.join(missing)} (expected "
                              f"{', '.join(d + '/' for d in fam.folders.values())}, tokenizer/)")
    try:
        unet = unet_config_from_diffusers(read_json(sub["unet"] / "config.json"))
        # the family's preset of this size (SD 2.x: sd2-base at 64, sd2 at 96) gives what the folder does not say
        base = next((preset(p) for p in fam.presets if preset(p).unet.sample_size == unet.sample_size),
                    preset(fam.preset))
        cfg = replace(base, unet=unet, vae=vae_config_from_diffusers(read_json(sub["vae"] / "config.json")),
                      text=fam.text_config_from_json(*(read_json(sub[p] / "config.json") for p in sub
                                                       if p.startswith("text"))))
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: a config.json lacks a required field ({e})") from e
    sched = path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        cfg = replace(cfg, ddim=fam.scheduler_defaults.updated(read_json(sched)))
    cfg = replace(cfg, image_size=cfg.unet.sample_size * cfg.vae_scale)
    check_prediction(cfg, f"{path}: scheduler/scheduler_config.json", "set \"prediction_type\": \"{want}\" there")
    if cfg.unet.cross_attention_dim != cfg.text.width:
        raise CheckpointError(f"{path}: the UNet cross-attends to width {cfg.unet.cross_attention_dim} but the text "
                              f"encoder is {cfg.text.width} wide (SD v1: 768 and 768, SD 2.x: 1024 and 1024, "
                              "LDM: 1280 and 1280)")
    files = {part: weights_file(sub[part], WEIGHT_STEMS[part], variant) for part in sub}
    if not (fam.runtime_pickles if pickles is None else pickles):
        unsafe = [f for f in files.values() if f.suffix != ".safetensors"]
        if unsafe:
            raise needs_conversion(path, unsafe, fam)
    sds = {part: read_tensors(f) for part, f in files.items()}
    if fam.text_file_prefix:  # transformers >= 5.6 saves without the prefix
        sds["text"] = split_prefix(sds["text"], fam.text_file_prefix) or sds["text"]
    if "text_2" in sds:  # SDXL: the towers under their folder names; bigG keeps its top-level text_projection
        strip = lambda sd: {k.removeprefix(fam.text_file_prefix): v for k, v in sd.items()}  # noqa: E731
        sds["text"] = {**{"text_encoder." + k: v for k, v in sds["text"].items()},
                       **{"text_encoder_2." + k: v for k, v in strip(sds.pop("text_2")).items()}}
    sds["vae"] = vae_from_diffusers(sds["vae"])
    tok = path / "tokenizer"
    return cfg, sds, tok if tok.is_dir() else None


# --- CompVis single files --------------------------------------------------------------------------

def identify(sd: dict, path: Path | str) -> Family:
    """The family of a CompVis single file; a CheckpointError naming the model for anything else."""
    conv_in = sd.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise CheckpointError(f"{path} has a UNet with {conv_in.shape[1]} input channels (an inpainting or "
                              "depth model); Prompt-to-Prompt needs a plain 4-channel text-to-image UNet")
    if SDXL_TELL in sd and any(k.startswith("conditioner.embedders.0.transformer.") for k in sd):  # CLIP-L, then bigG
        return FAMILIES["sdxl"]
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise CheckpointError(f"{path} is an SDXL checkpoint other than SDXL base (its text embedders are not CLIP-L "
                              "and bigG: the refiner?); this project runs SD v1.x, 2.x, SDXL base and LDM text2img")
    if SD_V1_TELL not in sd:
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in sd):
            raise CheckpointError(f"{path} is a single diffusers UNet file; pass the whole diffusers folder "
                                  "(with unet/, vae/, text_encoder/, tokenizer/) instead")
        raise CheckpointError(f"{path} is not a Stable Diffusion v1 checkpoint (nor an LDM text2img one): it has no "
                              f"{SD_V1_TELL} (its first keys: {', '.join(sorted(sd)[:5])})")
    if OPEN_CLIP_TELL in sd or (CROSS_K in sd and sd[CROSS_K].shape[-1] == 1024):
        return FAMILIES["sd-v2"]
    return FAMILIES["ldm" if any(k.startswith(LDM_TELL) for k in sd) else "sd-v1"]


# The public SD 2.x files of both sizes have the same keys and shapes (sd2-sdxl.md §2.6): only the name tells
# the 512 eps model (v2-1_512-ema-pruned, 512-base-ema) from the 768 v model (v2-1_768-ema-pruned, 768-v-ema).
PRESET_BY_NAME = {"512": "sd2-base", "768": "sd2"}
# (family, native latent side) -> the prediction type the public models of that size were trained for
PREDICTION = {("sd-v2", 64): "epsilon", ("sd-v2", 96): "v_prediction"}


def preset_for_file(fam: Family, path: Path) -> str:
    """The preset a single file of `fam` is read with: the family's, or for SD 2.x the one its name says."""
    if not fam.presets:
        return fam.preset
    sizes = [n for n in PRESET_BY_NAME if n in path.name]
    if len(sizes) != 1:
        raise CheckpointError(
            f"{path} is a {fam.title} checkpoint, and its keys do not say whether it is the 512 px eps model or the "
            f"768 px v-prediction model (nor does its name): pass --model-config "
            + " or ".join(f"{p} ({'768 px, v' if p == 'sd2' else '512 px, eps'})" for p in fam.presets))
    return PRESET_BY_NAME[sizes[0]]


def check_prediction(cfg: ModelConfig, what: str, fix: str):
    """Refuse a public model's size paired with the other prediction type: a 768 px SD 2 model sampled as
    eps (or a 512 px one as v) gives noise without any other sign of the mistake."""
    want = PREDICTION.get((cfg.family, cfg.unet.sample_size))
    got = cfg.ddim.prediction_type
    if want and got != want:
        side = cfg.unet.sample_size * cfg.vae_scale
        raise CheckpointError(f"{what} says prediction_type {got!r}, but a {side} px {family(cfg.family).title} "
                              f"model predicts {want!r}: {fix.format(want=want)}")


def read_single_file(path: Path, config: str | ModelConfig | None, ema: bool, pickles: bool | None = None):
    """-> (ModelConfig, state dicts) of a CompVis single file."""
    cfg = preset(config) if isinstance(config, str) else config
    allowed = lambda fam: fam.runtime_pickles if pickles is None else pickles  # noqa: E731
    if cfg is not None and path.suffix != ".safetensors" and not allowed(family(cfg.family)):
        raise needs_conversion(path, [path], family(cfg.family))  # known before reading gigabytes
    sd = read_tensors(path)
    fam = identify(sd, path)
    cfg = cfg or preset(preset_for_file(fam, path))
    if path.suffix != ".safetensors" and not allowed(fam):
        raise needs_conversion(path, [path], fam)
    sds = split_single_file(sd, cfg, ema, path)
    if fam.presets and cfg.family == fam.name:
        named = [n for n in PRESET_BY_NAME if n in path.name]
        stated = preset(PRESET_BY_NAME[named[0]]) if len(named) == 1 else None
        if stated is not None and stated.ddim.prediction_type != cfg.ddim.prediction_type:
            raise CheckpointError(f"{path} is named as the {stated.image_size} px {fam.title} model, which predicts "
                                  f"{stated.ddim.prediction_type!r}, but the config given says "
                                  f"{cfg.ddim.prediction_type!r}: pass --model-config {PRESET_BY_NAME[named[0]]}")
        check_prediction(cfg, f"{path}: the config given", "pass --model-config " + " or ".join(fam.presets))
    return cfg, sds


def split_single_file(sd: dict, cfg: ModelConfig, ema: bool = True, path: Path | str = "checkpoint") -> dict:
    """A CompVis single file's tensors -> {"unet", "vae", "text"} in our names; every key accounted for."""
    fam = identify(sd, path)
    if fam.name != cfg.family:
        raise CheckpointError(f"{path} is a {fam.title} checkpoint but is being read with a {cfg.family!r} config; "
                              "leave out --model-config (the family is detected) or give "
                              + " or ".join(repr(p) for p in (fam.presets or (fam.preset,))))
    unet = split_prefix(sd, UNET)
    ema_keys = {k for k in sd if k.startswith("model_ema.")} - IGNORED_KEYS
    if ema and len(ema_keys) > 100:  # a full-EMA file: the EMA copy is the one to sample with
        ema_unet = {k: sd.get("model_ema.diffusion_model" + k.replace(".", "")) for k in unet}
        if None in ema_unet.values():
            raise CheckpointError(f"{path}: the EMA weights do not cover the UNet; load with ema=False")
        unet = ema_unet
    sds = {"unet": unet_from_compvis(unet, cfg.unet),
           "vae": vae_from_compvis(split_prefix(sd, VAE), len(cfg.vae.block_out_channels)),
           "text": fam.text_from_compvis(split_prefix(sd, fam.text_file_key), cfg.text)}
    leftover = {k for k in sd if not k.startswith((UNET, VAE, fam.text_file_key)) and k not in IGNORED_KEYS} - ema_keys
    if leftover:
        raise CheckpointError(f"{path} holds {len(leftover)} entries that belong to no {fam.title} network: "
                              f"{', '.join(sorted(leftover)[:8])}")
    return sds
