"""A single file read with another family's config (--model-config), for every ordered pair of the four families, on
the real key layouts (tests/fixtures, meta tensors): one line naming what the file is and the configs that fit."""
import itertools

import pytest

from models.checkpoint import CheckpointError
from models.families import FAMILIES
from models.presets import PRESETS
from p2p.files.loading import split_single_file
from tests.tiny import fixture_keys as fixture, meta

FILES = {"sd-v1": "sd_v1_single_file_keys.json", "sd-v2": "sd2_single_file_keys.json",
         "sdxl": "sdxl_single_file_keys.json", "ldm": "ldm_single_file_keys.json"}
CONFIGS = {"sd-v1": "sd-v1", "sd-v2": "sd2", "sdxl": "sdxl", "ldm": "ldm"}


@pytest.mark.parametrize("file_family,config_family", list(itertools.permutations(FILES, 2)))
def test_every_wrong_family_is_one_error(file_family, config_family):
    fam = FAMILIES[file_family]
    with pytest.raises(CheckpointError) as e:
        split_single_file(meta(fixture(FILES[file_family])), PRESETS[CONFIGS[config_family]], path=FILES[file_family])
    message = str(e.value)
    assert f"is a {fam.title} checkpoint but is being read with a {config_family!r} config" in message
    assert "leave out --model-config" in message and repr(fam.presets[0] if fam.presets else fam.preset) in message
    assert "\n" not in message


@pytest.mark.parametrize("family", FILES)
def test_each_file_with_its_own_config_is_read(family):
    cfg = PRESETS[CONFIGS[family]]
    sds = split_single_file(meta(fixture(FILES[family])), cfg, path=FILES[family])
    assert set(sds) == {"unet", "vae", "text"} and all(sds.values())


@pytest.mark.parametrize("config_family", ["sd-v2", "sdxl", "ldm"])
def test_a_folder_read_with_another_family_config_is_one_error(tmp_path, clip_vocab_dir, config_family):
    """A folder is read with its own config; --model-config of another family is refused, not ignored: the
    native embedded folder and a diffusers SD v1 folder."""
    from p2p.files.loading import read_model
    from tests.tiny import reference_pipeline, save_folder
    folder = save_folder(reference_pipeline(clip_vocab_dir), tmp_path / "sd")
    for path in ("embedded", folder):
        with pytest.raises(CheckpointError) as e:
            read_model(path, config=CONFIGS[config_family])
        message = str(e.value)
        assert "is a Stable Diffusion v1 model folder" in message and f"--model-config {CONFIGS[config_family]}" in message
        assert "leave out --model-config" in message and "\n" not in message
    assert read_model(folder, config="sd-v1")[0].family == "sd-v1"  # its own family: read as before
