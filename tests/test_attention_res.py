"""`p2p attention --res`: the default is the model's local-blend level (p2p/core/sites.py), which every family has:
16 for SD v1 and SD 2.x-base, 24 for SD 2.x at 768 px (no 16x16 layer), 32 for SDXL (attention at 64 and 32 only),
8 for the embedded model; a --res the model lacks is one line listing the ones it has."""
import pytest
import torch

from models.presets import preset
from models.unet import UNet
from p2p.cli import main as cli
from p2p.core.sites import p2p_defaults
from p2p.files.output import read_settings
from tests.test_cli_errors import PROMPT, QUICK, one_line_error
from tests.tiny import reference_xl_pipeline


@pytest.mark.parametrize("name,res,grids", [("sd-v1", 16, [64, 32, 16]), ("sd2-base", 16, [64, 32, 16]),
                                            ("sd2", 24, [96, 48, 24]), ("sdxl", 32, [64, 32])])
def test_default_res_is_a_cross_attention_level_of_the_full_size_model(name, res, grids):
    cfg = preset(name)
    with torch.device("meta"):
        sites = UNet(cfg.unet).sites
    have = sorted({s.res for s in sites if s.kind == "cross" and s.place in ("up", "down")}, reverse=True)
    assert p2p_defaults(cfg).blend_res == res and have == grids


@pytest.fixture(scope="module")
def sdxl_folder(clip_vocab_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sdxl_res")
    reference_xl_pipeline(clip_vocab_dir).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_sdxl_default_and_a_missing_res(sdxl_folder, tmp_path, capsys):
    """tiny-sdxl has cross-attention at 4 and 2 only (SDXL's 64 and 32 in miniature); its default is 2 (latent/4)."""
    out = tmp_path / "maps.png"
    assert cli(["attention", "--model", sdxl_folder, "--prompt", "a cat on a chair", "--out", str(out), *QUICK]) == 0
    assert read_settings(out)["res"] == 2
    capsys.readouterr()
    assert cli(["attention", "--model", sdxl_folder, "--prompt", "a cat on a chair", "--res", "16",
                "--out", str(tmp_path / "m16.png"), *QUICK]) == 2
    one_line_error(capsys, "attention", "--res 16: this model's cross-attention maps in up,down are at res 4, 2",
                   "give one of them")
    assert not (tmp_path / "m16.png").exists()


def test_embedded_default_is_its_blend_level(tmp_path):
    out = tmp_path / "maps.png"
    assert cli(["attention", "--prompt", PROMPT, "--out", str(out), *QUICK]) == 0
    assert read_settings(out)["res"] == 8 == p2p_defaults(preset("embedded")).blend_res
