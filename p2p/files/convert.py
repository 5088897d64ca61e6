"""`p2p convert`: a model's PyTorch pickles -> a diffusers folder of safetensors, once, running no pickled code.

LDM text2img-large-256 is published only as pickles (`CompVis/ldm-text2im-large-256`: `unet/`, `vqvae/`,
`bert/` hold `*.bin`; the original `text2img-large/model.ckpt` is one Lightning pickle), and the runtime
reads LDM from safetensors only (p2p/files/loading.py). `convert(src, dst)` reads either layout, and SD v1's
(`sd-v1-4.ckpt`, a diffusers folder of `.bin`), with `read_model(..., pickles=True)`, i.e.
`torch.load(weights_only=True)`: a pickle that asks for anything but tensors and plain containers (a class
instance whose `__reduce__` calls `os.system`, say) is refused before it is run, with a `CheckpointError`.

The result is a diffusers folder like the public ones, with safetensors weights:

    model_index.json  scheduler/scheduler_config.json  tokenizer/
    unet/{config.json, diffusion_pytorch_model.safetensors}
    vqvae/ (LDM) or vae/ (SD v1, 2.x, XL): {config.json, diffusion_pytorch_model.safetensors}
    bert/ (LDM) or text_encoder/ (SD v1, 2.x, XL): {config.json, model.safetensors}
    SDXL also: text_encoder_2/{config.json, model.safetensors} (bigG, a CLIPTextModelWithProjection), tokenizer_2/

SDXL's single file (`sd_xl_base_1.0.safetensors`, or a .ckpt of the same layout, which the runtime does not read)
becomes the folder diffusers' StableDiffusionXLPipeline reads: CLIP-L and bigG apart, bigG's fused q/k/v split and
its `text_projection` a Linear weight (models/checkpoint.py `sdxl_text_from_sgm`), tokenizer_2 the same BPE padded
with "!" as the hub's.

The configs, the scheduler and the tokenizer of a source folder are copied as they are (model_index.json
too, with the components not written, e.g. SD's safety_checker, set to null). For a single file they are
written from the preset it is read with (the family's full-size one unless `config` says otherwise), and the
tokenizer, which a single file does not carry, comes from `tokenizer` (bare BPE files get the tokenizer_config.json
transformers needs: length 77 and the family's padding token). Tensors keep their
names (ours are the diffusers names; a VAE with the deprecated attention names gets the current ones) and
their dtypes; every network's weights are checked to fit it before anything is written. Everything is
written into a temporary folder next to `dst`, renamed to `dst` at the end: a failure leaves nothing.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.checkpoint import PICKLE_SUFFIXES, CheckpointError, check_fit, split_prefix
from models.families import Family, family
from models.presets import (ModelConfig, sdxl_text_configs_to_json, text_config_to_json, unet_config_to_diffusers,
                            vae_config_to_diffusers)
from models.sdxl import SDXLTextConfig
from models.tokenizer import _load_openai_bpe
from models.unet import UNet
from models.vae import AutoencoderKL

from p2p.files.loading import read_model

WEIGHT_NAMES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text": "model.safetensors", "text_2": "model.safetensors"}
LIBRARIES = {"UNet2DConditionModel": "diffusers", "AutoencoderKL": "diffusers", "DDIMScheduler": "diffusers",
             "LDMBertModel": "latent_diffusion", "CLIPTextModel": "transformers", "BertTokenizer": "transformers",
             "CLIPTokenizer": "transformers", "CLIPTextModelWithProjection": "transformers"}
TOWERS = {"text": "text_encoder.", "text_2": "text_encoder_2."}  # SDXL: our SDXLTextEncoder's two towers


def convert(src: str | Path, dst: str | Path, *, tokenizer: str | Path | None = None,
            config: str | ModelConfig | None = None, ema: bool = True) -> Path:
    """Write the model at `src` (a diffusers folder or a CompVis single file) to `dst` as a safetensors folder.

    `tokenizer` is required for a single file (and replaces a folder's own); `config` names the preset a
    single file is read with (default: its family's); `ema` takes the EMA UNet of a full-EMA file.
    Returns `dst`.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; convert into a new path (or delete {dst} first)")
    cfg, sds, tok_dir = read_pickles(src, config, ema)
    fam = family(cfg.family)
    tok_src = Path(tokenizer) if tokenizer else tok_dir
    if tok_src is None:
        raise CheckpointError(f"{src} is a single checkpoint and carries no tokenizer: pass --tokenizer PATH "
                              f"({fam.tokenizer_forms})")
    tok = fam.tokenizer.from_path(tok_src)  # a wrong tokenizer fails here, before anything is written
    with torch.device("meta"):
        modules = {"unet": UNet(cfg.unet), "vae": AutoencoderKL(cfg.vae), "text": fam.text_encoder(cfg.text)}
    for part, module in modules.items():
        check_fit(module, sds[part], {"unet": "UNet", "vae": "VAE", "text": "text encoder"}[part])

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result gets a folder's usual permissions
        write_folder(tmp, src, cfg, fam, sds, tok_src, tok)
        if dst.exists():
            raise CheckpointError(f"{dst} appeared while converting; the result was not written over it")
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_pickles(src: Path, config, ema: bool):
    """read_model(pickles=True), with a pickle that holds more than tensors named as such."""
    try:
        return read_model(src, config=config, ema=ema, pickles=True)
    except CheckpointError as e:
        if not isinstance(e.__cause__, pickle.UnpicklingError):
            raise
        culprit = next((p for p in pickle_files(src) if str(p) in str(e)), src)
        lines = [line.strip() for line in str(e.__cause__).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
        raise CheckpointError(
            f"{culprit} is not a plain tensor file: its pickle asks for more than tensors and plain containers "
            f"({detail.rstrip('.')}). Nothing was run: it was read with torch.load(weights_only=True), which refuses "
            "such pickles before executing them. Get the weights from a trusted source (`p2p download` verifies "
            "the sha256 of the public files)") from e


def pickle_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    return sorted(p for p in src.rglob("*") if p.suffix in PICKLE_SUFFIXES and p.is_file())


# --- writing -----------------------------------------------------------------------------------------

def write_folder(out: Path, src: Path, cfg: ModelConfig, fam: Family, sds: dict, tok_src: Path, tok) -> None:
    """A diffusers folder at `out`: what a source folder has is copied, the rest written from `cfg`."""
    source = src if src.is_dir() else None
    for part, sub in fam.folders.items():
        folder = out / sub
        folder.mkdir()
        save_file(own_storage(file_tensors(fam, part, sds)), str(folder / WEIGHT_NAMES[part]),
                  metadata={"format": "pt"})
        if source and (source / sub / "config.json").is_file():
            shutil.copy2(source / sub / "config.json", folder / "config.json")
        else:
            write_json(folder / "config.json", component_config(part, cfg))
    if source and (source / "scheduler").is_dir():
        shutil.copytree(source / "scheduler", out / "scheduler")
    else:
        write_json(out / "scheduler" / "scheduler_config.json", {"_class_name": "DDIMScheduler", **asdict(cfg.ddim)})
    write_tokenizer(out / "tokenizer", tok_src, tok)
    config = out / "tokenizer" / "tokenizer_config.json"
    if fam.name != "ldm" and not config.is_file():  # bare BPE files: transformers needs CLIP's length and padding
        first = getattr(tok, "first", tok)  # SDXL: tokenizer 1 (tokenizer_2 below)
        write_json(config, {"model_max_length": 77, "pad_token": first.pad_token})
    if "text_2" in fam.folders:  # SDXL's second tokenizer: the source's, else the same BPE padded with "!"
        if source and (source / "tokenizer_2").is_dir():
            shutil.copytree(source / "tokenizer_2", out / "tokenizer_2")
        else:
            write_bang_padded(out / "tokenizer", out / "tokenizer_2")
    index = source / "model_index.json" if source else None
    write_json(out / "model_index.json", model_index(fam, json.loads(index.read_text()) if index and
                                                     index.is_file() else None))


def file_tensors(fam: Family, part: str, sds: dict) -> dict:
    """One part's tensors under the names of its diffusers file: CLIP towers with transformers' `text_model.`
    prefix; SDXL's two towers, held together in our text encoder, apart, bigG's `text_projection` at the top level
    as in CLIPTextModelWithProjection."""
    if not part.startswith("text"):
        return sds[part]
    sd = split_prefix(sds["text"], TOWERS[part]) if "text_2" in fam.folders else sds["text"]
    if not fam.text_file_prefix:
        return sd
    return {k if k.startswith("text_projection.") else fam.text_file_prefix + k: v for k, v in sd.items()}


def component_config(part: str, cfg: ModelConfig) -> dict:
    if part == "unet":
        return unet_config_to_diffusers(cfg.unet)
    if part == "vae":
        return vae_config_to_diffusers(cfg.vae, cfg.image_size)
    if isinstance(cfg.text, SDXLTextConfig):
        return sdxl_text_configs_to_json(cfg.text)[part == "text_2"]
    return text_config_to_json(cfg.text)


def model_index(fam: Family, index: dict | None) -> dict:
    """The folder's model_index.json: the source's (components not written set to null) or a new one."""
    text_class = "LDMBertModel" if fam.name == "ldm" else "CLIPTextModel"
    tok_class = "CLIPTokenizer" if fam.name != "ldm" else fam.tokenizer.__name__
    ours = {fam.folders["unet"]: "UNet2DConditionModel", fam.folders["vae"]: "AutoencoderKL",
            fam.folders["text"]: text_class, "tokenizer": tok_class, "scheduler": "DDIMScheduler"}
    if "text_2" in fam.folders:
        ours.update({fam.folders["text_2"]: "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer"})
    if index is None:
        index = {"_class_name": fam.pipeline_class, "_diffusers_version": "0.42.1",
                 **{k: [LIBRARIES[c], c] for k, c in ours.items()}}
        if fam.pipeline_class == "StableDiffusionPipeline":
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        if fam.zero_negative:  # SDXL: an empty negative prompt is zeros (what the hub's model_index.json says)
            index.update(force_zeros_for_empty_prompt=True, image_encoder=[None, None], feature_extractor=[None, None])
        return index
    return {k: [None, None] if isinstance(v, list) and len(v) == 2 and k not in ours else v for k, v in index.items()}


def write_tokenizer(out: Path, src: Path, tok) -> None:
    """Copy a tokenizer folder as it is; write a single tokenizer file as a diffusers tokenizer/ folder."""
    if src.is_file() and src.name in ("vocab.json", "merges.txt"):  # one file of a CLIP folder
        src = src.parent
    if src.is_dir():
        shutil.copytree(src / "tokenizer" if (src / "tokenizer").is_dir() else src, out)
    elif hasattr(tok, "save"):  # BERT: vocab.txt or tokenizer.json -> vocab.txt + tokenizer_config.json
        tok.save(out)
    elif src.suffix == ".gz":  # OpenAI's CLIP BPE -> vocab.json + merges.txt
        vocab, merges = _load_openai_bpe(src)
        out.mkdir()
        (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    else:
        out.mkdir()
        shutil.copy2(src, out / "tokenizer.json")


def write_bang_padded(first: Path, out: Path) -> None:
    """SDXL's tokenizer_2 from tokenizer/: the same files, padded with "!" (the hub's special_tokens_map.json and
    tokenizer_config.json say so; models/sdxl.py reads the second tokenizer from the first either way)."""
    shutil.copytree(first, out)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        d = json.loads((out / name).read_text()) if (out / name).is_file() else {}
        d["pad_token"] = "!"
        if name == "tokenizer_config.json":
            d.setdefault("model_max_length", 77)
        write_json(out / name, d)


def own_storage(sd: dict) -> dict:
    """Contiguous tensors that share no memory (safetensors refuses shared storage, e.g. views of one tensor)."""
    seen, out = set(), {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.contiguous().clone() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    return out


def write_json(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
