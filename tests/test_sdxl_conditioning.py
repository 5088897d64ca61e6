"""SDXL's micro-conditioning set by hand (models/sdxl.py `SizeConditioning`): original size, crop top-left and target
size as diffusers' StableDiffusionXLPipeline takes them (tiny config, random weights, real CLIP vocabulary), through
the Python API and the --sdxl-* flags, and refused where they cannot apply."""
import numpy as np
import pytest
import torch

from models.errors import UserError
from models.sdxl import SizeConditioning
from p2p.cli import main as cli
from p2p.core.pipeline import Pipeline
from p2p.files.output import read_settings
from tests.test_cli_errors import PROMPT as EMBEDDED_PROMPT, one_line_error
from tests.tiny import reference_xl_pipeline, save_folder

PROMPT = "a photograph of an astronaut riding a horse"
SIZES = dict(original_size=(32, 48), crops_coords_top_left=(8, 16), target_size=(96, 64))


@pytest.fixture(scope="module")
def folder(clip_vocab_dir, tmp_path_factory):
    ref = reference_xl_pipeline(clip_vocab_dir)
    return ref, save_folder(ref, tmp_path_factory.mktemp("tiny_sdxl_sizes"))


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline.from_pretrained(folder[1], device="cpu")


def reference(ref, **sizes):
    out = ref(PROMPT, generator=torch.Generator("cpu").manual_seed(3), output_type="np", num_inference_steps=6,
              guidance_scale=5.0, height=64, width=64, **sizes).images[0]
    return (out * 255).round()


@pytest.mark.parametrize("sizes", [SIZES, dict(crops_coords_top_left=(0, 24)), dict(original_size=(16, 16))])
def test_sizes_and_crop_generate_as_diffusers(folder, pipe, sizes):
    """The same image as StableDiffusionXLPipeline given the same original_size / crops_coords_top_left /
    target_size (its negative_* sizes unset: both branches take them), and not the image of the default numbers."""
    ref, _ = folder
    expected = reference(ref, **sizes)
    (got,) = pipe.with_size_conditioning(**sizes).generate(PROMPT, seed=3, steps=6, height=64, width=64,
                                                           progress=False)
    diff = np.abs(np.asarray(got, float) - expected)
    (plain,) = pipe.generate(PROMPT, seed=3, steps=6, height=64, width=64, progress=False)
    print(f"mean abs {diff.mean():.4f}/255, max {diff.max():.0f}/255")
    assert diff.mean() <= 1.0
    assert np.abs(np.asarray(plain, float) - expected).mean() > 1.0  # the numbers reach the UNet


def test_time_ids_and_defaults():
    c = SizeConditioning(**SIZES)
    assert c.time_ids(64, 64, 2).tolist() == [[32, 48, 8, 16, 96, 64]] * 2
    assert SizeConditioning().time_ids(48, 80, 1).tolist() == [[48, 80, 0, 0, 48, 80]]
    assert SizeConditioning(target_size=[64, 64]).to_dict() == {"target_size": [64, 64]}
    assert SizeConditioning().is_default and SizeConditioning().to_dict() == {}
    for bad in (dict(original_size=(0, 64)), dict(crops_coords_top_left=(-1, 0)), dict(target_size=(64,)),
                dict(original_size=(64.5, 64))):
        with pytest.raises(UserError, match="two whole numbers"):
            SizeConditioning(**bad)


def test_refused_for_another_family(clip_vocab_dir):
    sd = Pipeline.from_config("tiny", clip_vocab_dir)
    with pytest.raises(UserError, match="condition SDXL only"):
        sd.with_size_conditioning(original_size=(64, 64))


def test_kept_by_with_config_and_checked_by_inversions(pipe, tmp_path):
    from PIL import Image

    from p2p.core.inversion import invert

    moved = pipe.with_size_conditioning(crops_coords_top_left=(0, 16))
    assert moved.with_config(steps=3).size_conditioning == moved.size_conditioning
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    inv = invert(moved, photo, "a cat on a chair", "direct", steps=2, progress=False)
    assert inv.info["size_conditioning"] == {"crops_coords_top_left": [0, 16]}
    assert inv.sampling_inputs(moved)["z_T"] is inv.z_T
    with pytest.raises(UserError, match="size conditioning .*crops_coords_top_left.* the image size"):
        inv.sampling_inputs(pipe)
    same = pipe.with_size_conditioning(original_size=(64, 64), crops_coords_top_left=(0, 16), target_size=(64, 64))
    assert inv.sampling_inputs(same)["z_T"] is inv.z_T  # the same numbers, spelt out


def test_cli_flags(folder, pipe, tmp_path, capsys):
    from PIL import Image

    ref, model = folder[0], str(folder[1])
    out = tmp_path / "g.png"
    assert cli(["generate", "--model", model, "--prompt", PROMPT, "--seed", "3", "--steps", "6", "--sdxl-original-size",
                "32,48", "--sdxl-crop", "8,16", "--sdxl-target-size", "96,64", "--out", str(out), "--quiet"]) == 0
    diff = np.abs(np.asarray(Image.open(out), float) - reference(ref, **SIZES))
    assert diff.mean() <= 1.0
    assert read_settings(out)["sdxl_crop"] == [8, 16] and read_settings(out)["sdxl_original_size"] == [32, 48]
    capsys.readouterr()
    assert cli(["generate", "--prompt", EMBEDDED_PROMPT, "--sdxl-crop", "0,16", "--out", str(tmp_path / "e.png"),
                "--steps", "1", "--quiet"]) == 2
    one_line_error(capsys, "generate", "--sdxl-crop: only SDXL is conditioned", "Stable Diffusion v1", "leave them out")
    assert not (tmp_path / "e.png").exists()
    assert cli(["generate", "--model", model, "--prompt", PROMPT, "--sdxl-original-size", "1024",
                "--out", str(tmp_path / "f.png")]) == 2
    one_line_error(capsys, "generate", "--sdxl-original-size", "two whole numbers >= 1", "'1024'")
