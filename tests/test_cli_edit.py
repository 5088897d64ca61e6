"""`p2p edit`, `p2p sweep`, `p2p attention` on a tiny diffusers folder: files, metadata, errors."""
import json

import numpy as np
import pytest
from PIL import Image

from p2p.cli import main as cli
from p2p.core.settings import EditSettings
from p2p.files.output import MIN_TILE
from tests.tiny import reference_pipeline

FAST = ["--steps", "4", "--height", "64", "--width", "64", "--device", "cpu", "--quiet"]
TILE = max(64, MIN_TILE)  # sheets magnify the 64 px images to at least MIN_TILE


@pytest.fixture(scope="module")
def model(clip_vocab_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd")
    reference_pipeline(clip_vocab_dir).save_pretrained(path, safe_serialization=True)
    return str(path)


def settings_of(path):
    return json.loads(Image.open(path).text["p2p"])


def test_edit_writes_source_edits_and_grid_with_settings(model, tmp_path):
    out = tmp_path / "edit"
    assert cli(["edit", "--model", model, "--prompt", "a cat on a chair", "--target", "a dog on a chair",
                "--target", "a tyrannosaurus on a chair", "--mode", "replace", "--cross-replace", "default_=1,dog=0.4",
                "--self-replace", "0.5", "--reweight", "dog=2", "--seed", "3", "--out-dir", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "2.png", "grid.png"]
    s = settings_of(out / "1.png")
    assert s["index"] == 1 and s["prompt"] == "a cat on a chair" and s["seed"] == 3
    assert s["targets"] == ["a dog on a chair", "a tyrannosaurus on a chair"]
    assert s["cross_replace"] == {"default_": 1.0, "dog": 0.4} and s["reweight"] == {"dog": 2.0}
    # the settings stored in the PNG rebuild the edit
    stored = {k: v for k, v in s.items() if k not in ("command", "index", "model")}
    assert EditSettings.from_dict(stored).prompts == ["a cat on a chair", "a dog on a chair", "a tyrannosaurus on a chair"]
    assert Image.open(out / "grid.png").size[0] == 3 * TILE


def test_edit_source_equals_generate(model, tmp_path):
    assert cli(["edit", "--model", model, "--prompt", "a cat on a chair", "--target", "a dog on a chair",
                "--seed", "5", "--out-dir", str(tmp_path / "e"), *FAST]) == 0
    assert cli(["generate", "--model", model, "--prompt", "a cat on a chair", "--seed", "5",
                "--out", str(tmp_path / "g.png"), *FAST]) == 0
    a = np.asarray(Image.open(tmp_path / "e" / "0.png").convert("RGB"), float)
    b = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"), float)
    assert np.abs(a - b).mean() <= 1.0


def test_edit_from_a_config_file_with_flag_overrides(model, tmp_path):
    cfg = tmp_path / "e.toml"
    cfg.write_text('prompt = "a house on a hill"\ntargets = ["a house on a hill at winter"]\nmode = "refine"\n'
                   'seed = 9\ncross_replace = [0.1, 0.7]\n')
    assert cli(["edit", "--model", model, "--config", str(cfg), "--seed", "11", "--self-res", "4,2",
                "--out-dir", str(tmp_path / "o"), *FAST]) == 0
    s = settings_of(tmp_path / "o" / "0.png")
    assert s["mode"] == "refine" and s["seed"] == 11 and s["cross_replace"] == [0.1, 0.7]
    assert s["self_sites"]["res"] == [4, 2]


@pytest.mark.parametrize("args,message", [
    (["--target", "a big dog on a chair"], "same number of words"),
    (["--target", "a dog on a chair", "--blend", "horse"], "local blend word 'horse' is in none of the prompts"),
    (["--target", "a dog on a chair", "--self-replace", "1.5"], r"--self-replace: must be a fraction .*got 1.5"),
])
def test_edit_errors_are_one_line(model, tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert cli(["edit", "--model", model, "--prompt", "a cat on a chair", *args, "--out-dir", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2p edit: error:") and err.count("\n") == 1
    import re
    assert re.search(message, err)
    assert not out.exists()  # nothing half-written


def test_sweep_grid(model, tmp_path):
    out = tmp_path / "sweep.png"
    assert cli(["sweep", "--model", model, "--prompt", "a cat on a chair", "--target", "a dog on a chair",
                "--param", "cross_replace", "--values", "0,0.5,1", "--out", str(out), *FAST]) == 0
    img = Image.open(out)
    assert img.size[0] == 4 * TILE  # the source, then one column per value
    assert json.loads(img.text["p2p"])["values"] == ["0.0", "0.5", "1.0"]
    out = tmp_path / "layers.png"
    assert cli(["sweep", "--model", model, "--prompt", "a cat on a chair", "--target", "a dog on a chair",
                "--param", "self_res", "--values", "8,4;2", "--out", str(out), *FAST]) == 0
    assert Image.open(out).size[0] == 3 * TILE


def test_attention_sheet(model, tmp_path):
    out = tmp_path / "maps.png"
    assert cli(["attention", "--model", model, "--prompt", "a cat on a chair", "--res", "2", "--self-components", "3",
                "--out", str(out), *FAST]) == 0
    img = Image.open(out)
    assert img.size[0] == 7 * 256  # bos, a, cat, on, a, chair, eos
    assert (tmp_path / "maps-self.png").exists()
    out = tmp_path / "edit-maps.png"
    assert cli(["attention", "--model", model, "--prompt", "a cat on a chair", "--target", "a dog on a chair",
                "--res", "2", "--out", str(out), *FAST]) == 0
    assert Image.open(out).size[0] == 7 * 256
