"""`p2p convert` on SDXL (tiny config, random weights, real CLIP vocabulary): a single file in the sd_xl_base_1.0
layout (as a .ckpt pickle, which the runtime refuses for SDXL) and a diffusers folder become safetensors folders
with both towers and both tokenizers; each loads back to the same weights and images, and diffusers'
StableDiffusionXLPipeline reads the folder written from the single file (its configs are ours) to the same image."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from transformers import CLIPTokenizer as RefTokenizer

from models.checkpoint import UNET_RESNET_RENAMES, VAE_RENAMES, CheckpointError, rename, unet_prefixes, vae_prefixes
from models.presets import PRESETS
from p2p.cli import main as cli
from p2p.core.pipeline import Pipeline
from p2p.files.convert import convert
from tests.test_sdxl import BIG_G, to_open_clip
from tests.tiny import SD_DDIM, reference_xl_pipeline

TINY = PRESETS["tiny-sdxl"]
PROMPT = "a photograph of an astronaut riding a horse"


@pytest.fixture(scope="module")
def folder(clip_vocab_dir, tmp_path_factory):
    ref = reference_xl_pipeline(clip_vocab_dir)
    path = tmp_path_factory.mktemp("tiny_sdxl_convert") / "folder"
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


@pytest.fixture(scope="module")
def single_file(folder, tmp_path_factory):
    """The reference's weights in sgm's single-file names (tests/test_sdxl.py builds and checks the same layout), saved
    as a PyTorch pickle."""
    ref, _ = folder
    up = {v: k for k, v in unet_prefixes(TINY.unet).items()}
    us = {v: k for k, v in UNET_RESNET_RENAMES.items()}
    vp = {v: k for k, v in vae_prefixes(len(TINY.vae.block_out_channels)).items()}
    vs = {v: k for k, v in VAE_RENAMES.items()}
    sd = {"model.diffusion_model." + rename(k, up, us): v for k, v in ref.unet.state_dict().items()}
    for k, v in ref.vae.state_dict().items():
        k = rename(k, vp, vs)
        sd["first_stage_model." + k] = v[:, :, None, None] if ".attn_1." in k and v.ndim == 2 else v
    sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in ref.text_encoder.state_dict().items()})
    sd.update({BIG_G + k: v for k, v in to_open_clip(ref.text_encoder_2.state_dict()).items()})
    path = tmp_path_factory.mktemp("tiny_sdxl_ckpt") / "tiny_sd_xl_base.ckpt"
    torch.save({"state_dict": {k: v.clone().contiguous() for k, v in sd.items()}}, path)
    return path


def same_weights(a: Pipeline, b: Pipeline):
    for x, y in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        sx, sy = x.state_dict(), y.state_dict()
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k], sy[k]) for k in sx)


def image(pipe: Pipeline):
    (img,) = pipe.generate(PROMPT, seed=3, steps=4, progress=False)
    return np.asarray(img, float)


def test_folder_round_trip(folder, tmp_path):
    ref, src = folder
    out = convert(src, tmp_path / "converted")
    assert {p.name for p in out.iterdir()} >= {"unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                               "tokenizer_2", "scheduler", "model_index.json"}
    assert all(p.suffix != ".bin" for p in out.rglob("*"))
    a, b = Pipeline.from_pretrained(src, device="cpu"), Pipeline.from_pretrained(out, device="cpu")
    assert a.cfg == b.cfg and b.cfg.family == "sdxl"
    same_weights(a, b)
    assert np.array_equal(image(a), image(b))


def test_single_file_round_trip_and_diffusers_reads_it(folder, single_file, clip_vocab_dir, tmp_path):
    ref, _ = folder
    with pytest.raises(CheckpointError, match="p2p convert"):  # SDXL reads safetensors only at runtime
        Pipeline.from_pretrained(single_file, tokenizer=clip_vocab_dir, config="tiny-sdxl", device="cpu")
    out = convert(single_file, tmp_path / "converted", tokenizer=clip_vocab_dir, config="tiny-sdxl")
    ours = Pipeline.from_pretrained(out, device="cpu")
    direct = Pipeline.from_pretrained(convert(single_file, tmp_path / "again", tokenizer=clip_vocab_dir,
                                              config="tiny-sdxl"), device="cpu")
    from_folder = Pipeline.from_pretrained(folder[1], device="cpu")
    assert ours.cfg.unet == TINY.unet and ours.cfg.text == TINY.text and ours.cfg.family == "sdxl"
    same_weights(ours, from_folder)
    same_weights(ours, direct)
    got = image(ours)
    assert np.array_equal(got, image(from_folder))
    # diffusers reads the written configs, both towers and both tokenizers (the second padded with "!")
    theirs = StableDiffusionXLPipeline.from_pretrained(out)
    assert theirs.tokenizer_2.pad_token == "!" and isinstance(theirs.tokenizer_2, type(theirs.tokenizer))
    files = str(clip_vocab_dir / "vocab.json"), str(clip_vocab_dir / "merges.txt")
    ids = RefTokenizer(*files, pad_token="!")(["a cat!"], padding="max_length", max_length=77).input_ids
    assert theirs.tokenizer_2(["a cat!"], padding="max_length", max_length=77).input_ids == ids
    theirs.scheduler = DDIMScheduler(**SD_DDIM)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="np", num_inference_steps=4,
                      guidance_scale=5.0).images[0]
    diff = np.abs(got - (expected * 255).round())
    print(f"diffusers from the converted single file: mean abs {diff.mean():.4f}/255, max {diff.max():.0f}/255")
    assert diff.mean() <= 1.0


def test_cli_convert(single_file, clip_vocab_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli(["convert", str(single_file), str(out), "--tokenizer", str(clip_vocab_dir),
                "--model-config", "tiny-sdxl"]) == 0
    assert (out / "text_encoder_2" / "model.safetensors").is_file()
    capsys.readouterr()
    assert cli(["convert", str(single_file), str(tmp_path / "no_tok"), "--model-config", "tiny-sdxl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tokenizer" in err and not (tmp_path / "no_tok").exists()
