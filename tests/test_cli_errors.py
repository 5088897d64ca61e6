"""The command line tried as a new user would (issue 14, section 3): every mistake is one line naming the
problem and the fix, exit status 2, no traceback, found before the model loads where the arguments suffice;
Ctrl-C exits with 130 and leaves nothing half-written. Runs on the embedded model (64 px, CPU)."""
import json
import tomllib

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from p2p.cli import commands
from p2p.cli import main as cli
from p2p.core.pipeline import Pipeline
from p2p.files.loading import EMBEDDED_DIR
from p2p.files.output import read_settings
from p2p.world import scenes

PROMPT = "a big red striped circle on a blue background"
TARGET = "a big red striped square on a blue background"
QUICK = ["--steps", "2", "--quiet"]


def one_line_error(capsys, command, *words):
    """stderr is one line `p2p COMMAND: error: ...` containing every word; returns it."""
    err = capsys.readouterr().err
    assert err.startswith(f"p2p {command}: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture
def no_model(monkeypatch):
    """Loading the model fails the test: the error must come from the arguments alone."""
    def load_pipeline(args):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(commands, "load_pipeline", load_pipeline)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "scene.png"
    scenes.sample(1, 0)[0][0].save(path)
    return str(path)


# --- devices -------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_device_cuda_on_a_cpu_only_torch(no_model, tmp_path, capsys):
    assert cli(["generate", "--prompt", PROMPT, "--device", "cuda", "--out", str(tmp_path / "a.png")]) == 2
    one_line_error(capsys, "generate", "--device", "'cuda'", "devices available here: cpu", "--device cpu")
    assert not any(tmp_path.iterdir())


def test_unknown_device(no_model, tmp_path, capsys):
    assert cli(["edit", "--prompt", PROMPT, "--target", TARGET, "--device", "tpu",
                "--out-dir", str(tmp_path / "e")]) == 2
    one_line_error(capsys, "edit", "--device", "'tpu'", "cuda, mps or cpu", "devices available here: cpu")


# --- output paths ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", PROMPT, "--out", "{dir}"],
    ["sweep", "--prompt", PROMPT, "--target", TARGET, "--param", "cross_replace", "--values", "0,1", "--out", "{dir}"],
    ["attention", "--prompt", PROMPT, "--out", "{dir}"],
    ["invert", "--prompt", PROMPT, "--image", "{photo}", "--out", "{dir}"],
    ["invert", "--prompt", PROMPT, "--image", "{photo}", "--out", "{dir}/inv.safetensors", "--reconstruction", "{dir}"],
])
def test_out_naming_a_folder_is_refused_before_loading(no_model, tmp_path, photo, capsys, argv):
    folder = tmp_path / "existing"
    folder.mkdir()
    assert cli([a.format(dir=folder, photo=photo) for a in argv]) == 2
    one_line_error(capsys, argv[0], f"{folder} is a folder", "give a file name")
    assert list(tmp_path.iterdir()) == [folder] and not any(folder.iterdir())  # no DIR.tmp, nothing inside


@pytest.mark.parametrize("command", [["edit", "--prompt", PROMPT, "--target", TARGET], ["eval"]])
def test_out_dir_naming_a_file_is_refused_before_loading(no_model, tmp_path, capsys, command):
    file = tmp_path / "existing.png"
    file.write_bytes(b"mine")
    assert cli([*command, "--out-dir", str(file)]) == 2
    one_line_error(capsys, command[0], f"--out-dir {file} is a file", "choose a folder name")
    assert list(tmp_path.iterdir()) == [file] and file.read_bytes() == b"mine"


def test_out_suffix_jpg_writes_a_jpeg(tmp_path, capsys):
    out = tmp_path / "x.jpg"
    assert cli(["generate", "--prompt", PROMPT, "--out", str(out), *QUICK]) == 0
    assert out.read_bytes()[:3] == b"\xff\xd8\xff" and Image.open(out).format == "JPEG"
    assert read_settings(out)["prompt"] == PROMPT  # the settings ride in the JPEG comment
    assert sorted(tmp_path.iterdir()) == [out]


@pytest.mark.parametrize("name", ["x.gif", "x"])
def test_out_suffix_gif_or_none_is_refused_before_loading(no_model, tmp_path, capsys, name):
    assert cli(["generate", "--prompt", PROMPT, "--out", str(tmp_path / name)]) == 2
    one_line_error(capsys, "generate", "not an image format", ".png, .jpg, .jpeg, .webp")
    assert not any(tmp_path.iterdir())


def test_invert_out_must_be_safetensors(no_model, tmp_path, photo, capsys):
    assert cli(["invert", "--prompt", PROMPT, "--image", photo, "--out", str(tmp_path / "inv.png")]) == 2
    one_line_error(capsys, "invert", "--out", ".safetensors")


# --- Ctrl-C -----------------------------------------------------------------------------------------------

def interrupted(capsys, command):
    captured = capsys.readouterr()
    assert captured.err == f"p2p {command}: interrupted; no file was left half-written\n", captured.err


def test_ctrl_c_while_sampling_exits_130(monkeypatch, tmp_path, capsys):
    def denoise(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Pipeline, "denoise", denoise)
    assert cli(["generate", "--prompt", PROMPT, "--out", str(tmp_path / "a.png"), *QUICK]) == 130
    interrupted(capsys, "generate")
    assert not any(tmp_path.iterdir())


def test_ctrl_c_while_writing_leaves_no_partial_file(monkeypatch, tmp_path, capsys):
    def save(self, fp, *a, **k):  # half a file, then Ctrl-C
        open(fp, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", save)
    assert cli(["generate", "--prompt", PROMPT, "--out", str(tmp_path / "a.png"), *QUICK]) == 130
    interrupted(capsys, "generate")
    assert not any(tmp_path.iterdir())  # neither a.png nor .a.png.tmp


@pytest.mark.parametrize("existing", [False, True])
def test_ctrl_c_in_edit_writes_the_folder_complete_or_not_at_all(monkeypatch, tmp_path, capsys, existing):
    import p2p.core.run as run

    out = tmp_path / "edit"
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    real, calls = run.save_image, []

    def save_image(*a, **k):  # 0.png and 1.png are written, then Ctrl-C
        calls.append(a[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(run, "save_image", save_image)
    argv = ["edit", "--prompt", PROMPT, "--target", TARGET, "--out-dir", str(out), *QUICK]
    assert cli(argv) == 130
    interrupted(capsys, "edit")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no temporary folder either
    monkeypatch.setattr(run, "save_image", real)
    assert cli(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "grid.png"] + (["old.txt"] if existing else [])
    assert [p.name for p in tmp_path.iterdir()] == ["edit"]


# --- numbers ---------------------------------------------------------------------------------------------

GEN = ["generate", "--prompt", PROMPT, "--out", "{out}.png"]
EDIT = ["edit", "--prompt", PROMPT, "--target", TARGET, "--out-dir", "{out}"]


@pytest.mark.parametrize("argv,words", [
    (GEN + ["--steps", "0"], ["--steps", "from 1 to 1000, got 0", "the model's default"]),
    (GEN + ["--steps", "-1"], ["--steps", "got -1"]),
    (GEN + ["--steps", "1001"], ["--steps", "got 1001"]),
    (GEN + ["--height", "0"], ["--height", "positive", "got 0"]),
    (GEN + ["--width", "-64"], ["--width", "positive", "got -64"]),
    (GEN + ["--height", "63"], ["--height 63 is not a multiple of 4", "use 60 or 64"]),
    (GEN + ["--eta", "1.5"], ["--eta", "from 0", "to 1", "got 1.5"]),
    (GEN + ["--guidance", "nan"], ["--guidance", "finite", "got nan"]),
    (GEN + ["--guidance", "inf"], ["--guidance", "finite", "got inf"]),
    (GEN + ["--seed", "-1"], ["--seed", "got -1"]),
    (EDIT + ["--steps", "0"], ["--steps", "got 0"]),
    (EDIT + ["--blend-threshold", "2"], ["--blend-threshold", "from 0 to 1", "got 2"]),
    (EDIT + ["--cross-replace", "0.9,0.1"], ["--cross-replace", "start <= end", "got 0.9,0.1"]),
    (EDIT + ["--reweight", "red=nan"], ["--reweight", "finite", "red=nan"]),
    (EDIT + ["--cross-res", "-8"], ["--cross-res", ">= 0"]),
    (["eval", "--n", "0"], ["--n", "positive", "got 0"]),
    (["eval", "--n", "-3"], ["--n", "got -3"]),
    (["eval", "--parts", "plain,fadr"], ["--parts", "plain,swaps,refine,fader,blend,vae", "'plain,fadr'"]),
    (["attention", "--prompt", PROMPT, "--out", "{out}.png", "--res", "0"], ["--res", "positive", "got 0"]),
    (["attention", "--prompt", PROMPT, "--out", "{out}.png", "--window", "0.5,0.2"],
     ["--window", "start <= end", "got 0.5,0.2"]),
    (["invert", "--prompt", PROMPT, "--image", "{photo}", "--out", "{out}.safetensors", "--inner-steps", "0"],
     ["--inner-steps", "positive", "--inversion ddim"]),
    (["sweep", "--prompt", PROMPT, "--target", TARGET, "--param", "mode", "--values", "1", "--out", "{out}.png"],
     ["--param 'mode' cannot be swept", "reweight:WORD"]),
    (["sweep", "--prompt", PROMPT, "--target", TARGET, "--param", "eta", "--values", "0,2", "--out", "{out}.png"],
     ["--values: eta must be", "got 2"]),
])
def test_bad_numbers_are_refused_before_loading(no_model, tmp_path, photo, capsys, argv, words):
    assert cli([a.format(out=tmp_path / "out", photo=photo) for a in argv]) == 2
    one_line_error(capsys, argv[0], *words)
    assert not any(tmp_path.iterdir())


def test_guidance_nan_writes_nothing(tmp_path, capsys):
    """It used to write an all-black image and exit 0."""
    assert cli(["generate", "--prompt", PROMPT, "--guidance", "nan", "--out", str(tmp_path / "a.png"), *QUICK]) == 2
    one_line_error(capsys, "generate", "--guidance")
    assert not any(tmp_path.iterdir())


def test_steps_1000_run(monkeypatch, tmp_path, capsys):
    """1000 steps is inside the range and samples every training timestep once, 999 to 0 (it crashed in
    models/ddim.py). The UNet is replaced by a cheap stand-in: the schedule is what is tested."""
    real, seen = commands.load_pipeline, []

    def load_pipeline(args):
        pipe = real(args)
        monkeypatch.setattr(pipe.unet, "forward", lambda z, t, context, controller=None: seen.append(t) or 0.1 * z)
        return pipe
    monkeypatch.setattr(commands, "load_pipeline", load_pipeline)
    out = tmp_path / "a.png"
    assert cli(["generate", "--prompt", PROMPT, "--steps", "1000", "--out", str(out), "--quiet"]) == 0
    assert [int(t) for t in seen] == list(range(999, -1, -1))
    assert read_settings(out)["steps"] == 1000 and np.asarray(Image.open(out)).std() > 0


# --- files the user names ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,words", [
    ('prompt = "a red circle"\nsteps = \n', ["is not valid TOML"]),
    ('prompt = "a red circle"\ntargets = ["a red square"]\nsteps = 0\n', ["steps must be", "got 0"]),
    ('prompt = "a red circle"\ncolour = "red"\n', ["unknown edit settings: colour"]),
])
def test_a_broken_config_file_is_named(no_model, tmp_path, capsys, text, words):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert cli(["edit", "--config", str(config), "--out-dir", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "edit", str(config), *words)
    assert cli(["edit", "--config", str(tmp_path / "none.toml"), "--out-dir", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "edit", f"no edit settings file at {tmp_path / 'none.toml'}")
    assert list(tmp_path.iterdir()) == [config]


@pytest.mark.parametrize("header,words", [
    ("{not json", ["header is broken", "not a JSON object", "p2p invert"]),
    (json.dumps({"format": "p2p-inversion/1"}), ["header is broken", "lacks 'prompt'"]),
    (json.dumps({"format": "p2p-inversion/1", "prompt": PROMPT, "method": "ddim", "steps": "many", "guidance": 5,
                 "image_size": [64, 64]}), ["header is broken", "many"]),
    (None, ["not an inversion", "p2p invert"]),
])
def test_a_broken_inversion_file_is_named(no_model, tmp_path, capsys, header, words):
    from p2p.core.inversion import KEY

    path = tmp_path / "inv.safetensors"
    save_file({"z_T": torch.zeros(1, 4, 16, 16)}, str(path), metadata=None if header is None else {KEY: header})
    assert cli(["edit", "--inverted", str(path), "--target", TARGET, "--out-dir", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "edit", str(path), *words)


# --- attention ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,words", [
    (["--window", "0.5,0.5"], ["--window (0.5, 0.5) covers none of the 2 steps", "widen it"]),
    (["--res", "3"], ["--res 3", "are at res 16, 8", "give one of them"]),
])
def test_attention_maps_that_would_be_empty_are_refused_before_sampling(monkeypatch, tmp_path, capsys, flags, words):
    def denoise(*a, **k):
        raise AssertionError("sampled before the maps were checked")
    monkeypatch.setattr(Pipeline, "denoise", denoise)
    assert cli(["attention", "--prompt", PROMPT, *flags, "--out", str(tmp_path / "m.png"), *QUICK]) == 2
    one_line_error(capsys, "attention", *words)


# --- edits -----------------------------------------------------------------------------------------------

def test_self_max_res_all_and_a_bad_value(tmp_path, capsys, monkeypatch):
    assert cli(["edit", "--prompt", PROMPT, "--target", TARGET, "--self-max-res", "all", "--out-dir",
                str(tmp_path / "all"), *QUICK]) == 0
    assert read_settings(tmp_path / "all" / "1.png")["self_sites"]["max_res"] is None  # every layer
    assert cli(["edit", "--prompt", PROMPT, "--target", TARGET, "--out-dir", str(tmp_path / "default"), *QUICK]) == 0
    assert read_settings(tmp_path / "default" / "1.png")["self_sites"]["max_res"] == 8  # the embedded model's
    monkeypatch.setattr(commands, "load_pipeline", None)
    for bad in ("none", "0"):
        assert cli(["edit", "--prompt", PROMPT, "--target", TARGET, "--self-max-res", bad, "--out-dir",
                    str(tmp_path / "bad"), *QUICK]) == 2
        one_line_error(capsys, "edit", "--self-max-res", "'all'", f"got '{bad}'")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("flags,columns", [
    (["--target", TARGET, "--reweight", "striped=-1,1,3"], 3),  # one target, one image per value
    (["--mode", "reweight", "--reweight", "striped=-1,1,3"], 3),  # the prompt itself: no --target
    (["--mode", "reweight", "--reweight", "striped=2"], 1),
])
def test_reweight_takes_one_target_and_one_value_per_column(tmp_path, capsys, flags, columns):
    out = tmp_path / "e"
    assert cli(["edit", "--prompt", PROMPT, *flags, "--out-dir", str(out), *QUICK]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"{i}.png" for i in range(columns + 1)] + ["grid.png"]
    s = read_settings(out / "1.png")
    assert s["reweight"]["striped"] == ([-1.0, 1.0, 3.0] if columns == 3 else 2.0)


def test_reweight_values_that_fit_no_column_are_refused(no_model, tmp_path, capsys):
    assert cli(["edit", "--prompt", PROMPT, "--target", TARGET, "--target", TARGET, "--reweight", "striped=-1,1,3",
                "--out-dir", str(tmp_path / "e")]) == 2
    one_line_error(capsys, "edit", "3 values for 2 edited prompts", "one --target")


def test_an_edit_without_target_says_how(no_model, tmp_path, capsys):
    assert cli(["edit", "--prompt", PROMPT, "--out-dir", str(tmp_path / "e")]) == 2
    one_line_error(capsys, "edit", "add --target", "--mode reweight")


# --- the embedded model's words ------------------------------------------------------------------------------

def test_vocab_lists_the_words_by_attribute(capsys):
    assert cli(["vocab"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[4:] if line.strip()}
    assert set(rows["shape"]) == set(scenes.SHAPES) and set(rows["size"]) == set(scenes.SIZES)
    assert set(scenes.COLOURS) <= set(rows["colour"]) and "striped" in rows["pattern"]
    assert set(scenes.vocabulary()) <= set(out.replace("'", " ").split())


def test_unknown_words_give_one_warning_and_still_run(tmp_path, capsys):
    assert cli(["generate", "--prompt", "a cat on a red chair", "--out", str(tmp_path / "a.png"), *QUICK]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("p2p generate: warning:"), err
    assert "'cat', 'chair'" in err and "p2p vocab" in err and "'red'" not in err
    assert (tmp_path / "a.png").exists()
    assert cli(["generate", "--prompt", PROMPT, "--out", str(tmp_path / "b.png"), *QUICK]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", ["generate", "edit"])
def test_help_gives_the_models_defaults_and_points_to_vocab(capsys, command):
    assert cli([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "64 for the embedded model, 512 for SD v1" in text
    shipped = tomllib.loads((EMBEDDED_DIR / "model.toml").read_text())["guidance"]  # the folder, not the preset
    assert f"{shipped:g} for the embedded model, 7.5 for SD v1" in text
    assert "`p2p vocab`" in text and "1 to 1000" in text


# --- what is not a user error -----------------------------------------------------------------------------

@pytest.mark.parametrize("error", [ValueError, KeyError, RuntimeError])
def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path, error):
    def load_pipeline(args):
        raise error("a bug")
    monkeypatch.setattr(commands, "load_pipeline", load_pipeline)
    with pytest.raises(error):
        cli(["generate", "--prompt", PROMPT, "--out", str(tmp_path / "a.png")])


# --- sheets --------------------------------------------------------------------------------------------

def test_sheet_captions_stay_in_their_columns_and_keep_fader_values_whole():
    """`sweep` column labels overlapped and a reweight grid hid its c values: captions are now wrapped to the
    measured width of their (magnified) tile, a "[word xC]" group is never split, and long ones are cut."""
    from p2p.files.output import MIN_TILE, PAD, grid, text_width, wrap

    captions = ["a big red striped square and a small green star on a blue background [striped x-2]",
                "W" * 60, "cross_replace = (0.2, 0.6)", " ".join(["word"] * 200)]
    tile = max(64, MIN_TILE)
    for c in captions:
        lines = wrap(c, tile - 2 * PAD)
        assert all(text_width(line) <= tile - 2 * PAD for line in lines) and len(lines) <= 8
    assert "[striped x-2]" in wrap(captions[0], tile - 2 * PAD)
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "gray")]
    sheet = np.asarray(grid(images, captions))
    assert sheet.shape[1] == 4 * tile and sheet.shape[0] > tile
    band = sheet[tile:]
    for k in range(1, 4):  # no ink on either side of a column boundary: captions do not run into each other
        assert (band[:, k * tile - 1] == 255).all() and (band[:, k * tile] == 255).all()
