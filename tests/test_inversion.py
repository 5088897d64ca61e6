"""Real-image editing: image preparation, the four inversions, Inversion files, edits of inverted images, CLI.

The model is the tiny preset with random weights, adjusted so that inversion behaves as on a trained model:
the VAE scaling factor gives latents of about unit std (a trained SD VAE's 0.18215 does that, a random
one's latents are 20x smaller), the UNet's output is scaled down (x 0.05) so that eps varies slowly with
z_t (the DDIM ODE is then smooth, as for a trained model), and the cross-attention values are scaled up
(x 20) so that the text changes eps enough for guidance 7.5 to matter. Measured with 10 DDIM steps, as
mean((z_0 reconstructed - E(x))^2) / mean(E(x)^2):

    DDIM, w = 1    3.0e-4         DDIM, w = 7.5    2.2e-1
    null-text      2.1e-2         negative-prompt  3.0e-4 (= DDIM at w = 1)      direct  0 (exact)
"""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from models.presets import PRESETS
from models.tokenizer import CLIPTokenizer
from p2p.world import scenes
from p2p.cli import main as cli
from p2p.core.settings import EditSettings
from p2p.core.sites import SiteSelection
from p2p.core.run import run_edit
from p2p.files.images import encode_image, load_image, open_image, psnr
from p2p.core.inversion import Inversion, SourceOffsets, invert, reconstruct
from tests.tiny import tuned_for_inversion

STEPS = 10


def tuned_tiny(tok, seed=0):
    return tuned_for_inversion(PRESETS["tiny"], tok, seed=seed)


@pytest.fixture(scope="module")
def tok(clip_vocab_dir):
    return CLIPTokenizer.from_path(clip_vocab_dir)


@pytest.fixture(scope="module")
def pipe(tok):
    return tuned_tiny(tok)


@pytest.fixture(scope="module")
def scene():
    image, caption, _ = scenes.sample(1, 0)[0]
    return image, caption  # 64x64, "a small red square and a big yellow striped diamond on a orange background"


@pytest.fixture(scope="module")
def photo(scene, tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "scene.png"
    scene[0].save(path)
    return path


@pytest.fixture(scope="module")
def inversions(pipe, scene):
    image, caption = scene
    runs = {"ddim@1": ("ddim", 1.0), "ddim@7.5": ("ddim", 7.5), "null-text": ("null-text", 7.5),
            "negative-prompt": ("negative-prompt", 7.5), "direct": ("direct", 7.5)}
    return {k: invert(pipe, image, caption, m, steps=STEPS, guidance=w, progress=False) for k, (m, w) in runs.items()}


def rel_error(pipe, inv):
    z = reconstruct(pipe, inv, progress=False)
    return float((z - inv.z_0).pow(2).mean() / inv.z_0.pow(2).mean())


# --- image preparation -------------------------------------------------------------------------------------

def test_centre_crop_then_resize(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high: 16 columns cut on each side
    Image.fromarray(a).save(tmp_path / "wide.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "wide.png", 64)), a[:, 16:80])
    b = rng.integers(0, 256, (200, 128, 3), dtype=np.uint8)  # tall: rows 36..164, then 128 -> 64
    Image.fromarray(b).save(tmp_path / "tall.png")
    expected = Image.fromarray(b[36:164]).resize((64, 64), Image.LANCZOS)
    assert np.array_equal(np.asarray(load_image(tmp_path / "tall.png", 64)), np.asarray(expected))


def test_transparency_on_white_and_formats(tmp_path):
    a = np.zeros((64, 64, 4), dtype=np.uint8)
    a[:, :32] = (10, 20, 30, 255)  # left opaque, right fully transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "alpha.png")
    got = np.asarray(load_image(tmp_path / "alpha.png", 64))
    assert (got[:, :32] == (10, 20, 30)).all() and (got[:, 32:] == 255).all()
    img = scenes.sample(1, 1)[0][0]
    for fmt in ("jpg", "webp"):
        img.save(tmp_path / f"s.{fmt}", quality=95)
        assert psnr(load_image(tmp_path / f"s.{fmt}", 64), img) > 25  # lossy, but the same picture


def test_encoding_is_the_scaled_posterior_mean(pipe, scene):
    image = scene[0]
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    mean, _ = pipe.vae.posterior(x)
    assert torch.allclose(encode_image(pipe, image), mean * 3.6, atol=1e-6)


def noisy_image(path, fmt, size=(64, 64)):
    a = np.random.default_rng(1).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    Image.fromarray(a).save(path, format=fmt)
    return path


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_text("not a picture") and p, r"is not an image file PIL can read \(use a PNG, JPEG or WebP"),
    (lambda p: (p.write_bytes(noisy_image(p, "PNG").read_bytes()[:3000]), p)[1], r"truncated or corrupt"),
    (lambda p: (p.write_bytes(noisy_image(p, "JPEG").read_bytes()[:1500]), p)[1], r"truncated or corrupt"),
    (lambda p: (p.unlink(missing_ok=True), p.mkdir(), p)[2], r"is a folder, not an image file"),
    (lambda p: noisy_image(p, "PNG", (48, 300)), r"is 48x300 pixels, smaller than the model's 64x64: give an image "
                                                 r"at least 64 pixels on its shorter side"),
], ids=["not-an-image", "truncated-png", "truncated-jpeg", "folder", "too-small"])
def test_bad_images_are_refused_with_the_reason(pipe, tmp_path, make, message):
    path = make(tmp_path / "photo.png")
    with pytest.raises(ValueError, match=message):
        invert(pipe, path, "a red square", "ddim", steps=2, progress=False)


def test_missing_image_and_long_caption(pipe, photo, tmp_path):
    with pytest.raises(FileNotFoundError, match="no image at"):
        open_image(tmp_path / "nope.png")
    caption = " ".join(["a big red striped square"] * 20)
    with pytest.raises(ValueError, match=r"the caption .* is 10[0-9] tokens, more than the 77 the text encoder takes"):
        invert(pipe, photo, caption, "ddim", steps=2, progress=False)
    with pytest.raises(ValueError, match="unknown inversion method 'edict'"):
        invert(pipe, photo, "a red square", "edict", steps=2, progress=False)


# --- the inversions ------------------------------------------------------------------------------------------

def test_first_ddim_inversion_step_by_hand(pipe, scene):
    """z*_1 from z*_0 = E(x), with alpha_bar computed here from SD v1's betas and the timesteps of 10 steps."""
    alpha_bar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, 0)
    t, t_prev = 1, -99  # leading spacing with offset 1: 901, ..., 1; the step before t=1 is alpha_bar_0
    a_t, a_prev = alpha_bar[t], alpha_bar[0]
    z0 = encode_image(pipe, scene[0])
    eps = pipe.unet(z0, t, pipe.encode_text([scene[1]]))
    z1 = a_t.sqrt() * (z0 - (1 - a_prev).sqrt() * eps) / a_prev.sqrt() + (1 - a_t).sqrt() * eps
    inv = invert(pipe, scene[0], scene[1], "ddim", steps=1, guidance=1.0, progress=False)  # steps=1: t = 1 only
    assert pipe.ddim.timesteps(1) == [1]
    assert torch.allclose(inv.z_T, z1, atol=1e-6)
    assert pipe.ddim.timesteps(STEPS)[-1] == t and pipe.ddim.prev_timestep(t, STEPS) == t_prev


def test_ddim_inversion_at_guidance_1_reconstructs(pipe, inversions):
    inv = inversions["ddim@1"]
    assert (inv.z_T - inv.z_0).abs().mean() > 0.5  # z_T is far from the image latent: the test is not vacuous
    assert rel_error(pipe, inv) < 1e-3  # measured 3.0e-4
    assert inv.uncond is None and inv.offsets is None


def test_guidance_7_5_breaks_ddim_and_the_fixes_repair_it(pipe, inversions):
    err = {k: rel_error(pipe, inv) for k, inv in inversions.items()}
    assert err["ddim@7.5"] > 100 * err["ddim@1"]  # measured 2.2e-1 against 3.0e-4
    assert err["null-text"] < err["ddim@7.5"] / 5  # measured 2.1e-2
    assert err["negative-prompt"] == pytest.approx(err["ddim@1"], rel=1e-3)  # eps_u = eps_c: w drops out
    assert err["negative-prompt"] < err["ddim@7.5"] / 100 and err["direct"] < err["ddim@7.5"] / 100
    assert err["direct"] < 1e-10  # the source row is put back on the pivot trajectory every step


def test_null_text_follows_the_authors_adam_schedule(pipe, scene):
    """With one Adam iteration per step, every element moves by lr g / (|g| + 1e-8): the largest move of
    step i is its learning rate 1e-2 (1 - s / 100), s = 50 i / N the step on the authors' 50-step schedule,
    warm-started from the previous step's embedding."""
    inv = invert(pipe, scene[0], scene[1], "null-text", steps=STEPS, inner_steps=1, progress=False)
    phi = torch.cat([pipe.encode_text([""]), inv.uncond])
    moves = (phi[1:] - phi[:-1]).abs().flatten(1).amax(1)
    lr = 1e-2 * (1 - torch.arange(STEPS) * 50 / STEPS / 100)  # 1e-2, 0.95e-2, ..., 0.55e-2
    assert (moves <= lr * (1 + 1e-5)).all() and (moves >= lr * (1 - 3e-3)).all()  # measured 0.9986-0.9999 lr
    assert inv.info["iterations"] == [1] * STEPS and inv.uncond.shape == (STEPS, 77, 32)
    early = invert(pipe, scene[0], scene[1], "null-text", steps=4, early_stop=1.0, progress=False)
    assert early.info["iterations"] == [1] * 4  # every loss is below 1 + 2e-5 s: stop after the first update


def test_null_text_with_no_iterations_is_ddim(pipe, scene, inversions):
    inv = invert(pipe, scene[0], scene[1], "null-text", steps=STEPS, inner_steps=0, progress=False)
    ddim = inversions["ddim@7.5"]
    assert torch.equal(inv.uncond, pipe.encode_text([""]).expand(STEPS, -1, -1))
    assert torch.allclose(reconstruct(pipe, inv, progress=False), reconstruct(pipe, ddim, progress=False), atol=1e-6)


# --- the sampling loop's new inputs ---------------------------------------------------------------------------

def test_per_step_uncond_and_zero_offsets_are_bit_identical_to_plain(pipe):
    cond, uncond = pipe.encode_text(["a red square", "a blue square"]), pipe.encode_text([""])
    z_T = pipe.initial_latent(0, 64, 64)
    plain = pipe.denoise(z_T, cond, uncond, steps=4, guidance=7.5, progress=False)
    as_list = pipe.denoise(z_T, cond, [uncond] * 4, steps=4, guidance=7.5, progress=False)
    as_tensor = pipe.denoise(z_T, cond, uncond.expand(4, -1, -1)[:, None], steps=4, guidance=7.5, progress=False,
                             controller=SourceOffsets(torch.zeros(4, 1, 4, 8, 8)))
    assert torch.equal(plain, as_list) and torch.equal(plain, as_tensor)
    with pytest.raises(ValueError, match=r"uncond has 3 per-step entries for 4 steps"):
        pipe.denoise(z_T, cond, [uncond] * 3, steps=4, guidance=7.5, progress=False)


def test_offsets_move_only_the_source_row(pipe):
    cond, uncond = pipe.encode_text(["a red square", "a blue square"]), pipe.encode_text([""])
    z_T = pipe.initial_latent(0, 64, 64)
    plain = pipe.denoise(z_T, cond, uncond, steps=1, guidance=7.5, progress=False)
    d = torch.randn(1, 1, 4, 8, 8)
    moved = pipe.denoise(z_T, cond, uncond, steps=1, guidance=7.5, progress=False, controller=SourceOffsets(d))
    assert torch.allclose(moved[0], plain[0] + d[0, 0], atol=1e-6) and torch.equal(moved[1], plain[1])
    with pytest.raises(ValueError, match="offsets for 1 steps, the sampler runs 2"):
        pipe.denoise(z_T, cond, uncond, steps=2, guidance=7.5, progress=False, controller=SourceOffsets(d))


# --- editing inverted images ----------------------------------------------------------------------------------

def test_edit_with_identical_prompts_returns_the_reconstruction(pipe, scene, inversions):
    for key in ("null-text", "negative-prompt", "ddim@7.5"):
        inv = inversions[key]
        r = run_edit(pipe, EditSettings(scene[1], targets=(scene[1],)), inversion=inv, progress=False)
        rec = reconstruct(pipe, inv, progress=False)
        assert torch.allclose(r.z_0[0], rec[0], atol=1e-5), key
        assert torch.allclose(r.z_0[1], rec[0], atol=1e-5), key
        assert r.settings.steps == STEPS and r.settings.guidance == inv.guidance
    inv = inversions["direct"]  # Ju et al.: only the source row is corrected; it is the image latent
    r = run_edit(pipe, EditSettings(scene[1], targets=(scene[1],)), inversion=inv, progress=False)
    assert torch.allclose(r.z_0[0], inv.z_0[0], atol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(targets=("a small red circle and a big yellow striped diamond on a orange background",)),
    dict(targets=("a small red square and a big yellow striped diamond on a orange background at night",),
         mode="refine"),
    dict(mode="reweight", reweight={"yellow": 2.0}),
    dict(targets=("a small red circle and a big yellow striped diamond on a orange background",),
         blend=("square", "circle"), blend_sites=SiteSelection(kinds=("cross",), res=(8,)),
         blend_threshold=0.95),  # random maps are nearly flat
])
@pytest.mark.parametrize("method", ["null-text", "direct"])
def test_every_edit_kind_keeps_the_reconstruction_as_source(pipe, scene, inversions, kw, method):
    inv = inversions[method]
    r = run_edit(pipe, EditSettings(scene[1], **kw), inversion=inv, progress=False)
    assert torch.allclose(r.z_0[0], reconstruct(pipe, inv, progress=False)[0], atol=1e-5)
    assert len(r.images) == 2 and (r.z_0[1] - r.z_0[0]).abs().max() > 1e-3  # the edit did change something
    if "blend" in kw:  # outside the final mask the edit is the source (the reconstruction) exactly
        outside = r.controller.controllers[1].mask(tuple(r.z_0.shape[-2:]))[1, 0] == 0
        assert outside.any() and torch.equal(r.z_0[1][:, outside], r.z_0[0][:, outside])


def test_edit_settings_an_inversion_cannot_honour(pipe, scene, inversions, tok):
    inv = inversions["null-text"]
    cases = [(dict(prompt="a blue circle"), r"is not the caption the image was inverted with"),
             (dict(steps=20), r"made for steps=10, the edit asks for steps=20"),
             (dict(guidance=3.0), r"null-text inversion is made for guidance 7.5"),
             (dict(eta=0.5), r"deterministic DDIM"),
             (dict(negative_prompt="blurry"), r"drop the negative prompt"),
             (dict(height=128), r"made for height=64")]
    for change, message in cases:
        s = EditSettings(**{"prompt": scene[1], "targets": (scene[1],), **change})
        with pytest.raises(ValueError, match=message):
            run_edit(pipe, s, inversion=inv, progress=False)
    # ddim and negative-prompt inversions take any guidance
    s = EditSettings(scene[1], targets=(scene[1],), guidance=3.0)
    assert run_edit(pipe, s, inversion=inversions["negative-prompt"], progress=False).settings.guidance == 3.0
    with pytest.raises(ValueError, match="made with another model"):
        run_edit(tuned_tiny(tok, seed=1), EditSettings(scene[1], targets=(scene[1],)), inversion=inv, progress=False)


def test_model_fingerprint_ignores_dtype_but_not_weights(pipe, tok):
    from copy import deepcopy
    from types import SimpleNamespace

    from p2p.core.inversion import fingerprint, same_model

    mine = fingerprint(pipe)
    for dtype in (torch.float16, torch.bfloat16):
        assert same_model(mine, fingerprint(SimpleNamespace(unet=deepcopy(pipe.unet).to(dtype))))
    assert not same_model(mine, fingerprint(tuned_tiny(tok, seed=1)))


# --- files ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["ddim@7.5", "null-text", "negative-prompt", "direct"])
def test_save_load_roundtrip(pipe, inversions, key, tmp_path):
    inv = inversions[key]
    back = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    for name in ("prompt", "method", "steps", "guidance", "image_size", "info"):
        assert getattr(back, name) == getattr(inv, name), name
    for name in ("z_T", "uncond", "offsets", "z_0"):
        a, b = getattr(inv, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert torch.equal(reconstruct(pipe, back, progress=False), reconstruct(pipe, inv, progress=False))


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="is a safetensors file but not an inversion"):
        Inversion.load(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="is not a readable .safetensors file"):
        Inversion.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError, match="p2p invert"):
        Inversion.load(tmp_path / "missing.safetensors")


# --- command line ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(pipe, clip_vocab_dir, tmp_path_factory):
    """The tuned tiny model as a native folder (model.toml, model.safetensors, tokenizer/) for --model."""
    from safetensors.torch import save_file

    from models.presets import to_toml

    path = tmp_path_factory.mktemp("tiny_native")
    save_file({f"{name}.{k}": v.contiguous() for name, m in (("unet", pipe.unet), ("vae", pipe.vae),
                                                              ("text", pipe.text_encoder))
               for k, v in m.state_dict().items()}, str(path / "model.safetensors"))
    (path / "model.toml").write_text(to_toml(pipe.cfg))
    (path / "tokenizer").mkdir()
    for name in ("vocab.json", "merges.txt"):
        (path / "tokenizer" / name).write_bytes((clip_vocab_dir / name).read_bytes())
    return str(path)


FAST = ["--steps", "4", "--device", "cpu", "--quiet"]


def test_cli_invert_then_edit_the_saved_inversion(model, photo, scene, tmp_path, capsys):
    out = tmp_path / "inv.safetensors"
    assert cli(["invert", "--model", model, "--image", str(photo), "--prompt", scene[1], "--inversion", "direct",
                "--out", str(out), "--reconstruction", str(tmp_path / "rec.png"), *FAST]) == 0
    assert re.search(r"wrote .*inv.safetensors: direct inversion, 4 steps.*PSNR [0-9.]+ dB", capsys.readouterr().out)
    inv = Inversion.load(out)
    assert inv.method == "direct" and inv.steps == 4 and inv.prompt == scene[1] and inv.info["image"] == str(photo)
    edit = tmp_path / "edit"
    target = scene[1].replace("square", "circle")
    # (no --blend: this model's blend maps are 2x2 at 64 px, which local blend refuses; blending an inverted
    # image is tested above through the Python API)
    assert cli(["edit", "--model", model, "--inverted", str(out), "--target", target,
                "--out-dir", str(edit), "--device", "cpu", "--quiet"]) == 0
    s = json.loads(Image.open(edit / "1.png").text["p2p"])
    assert s["prompt"] == scene[1] and s["inversion"] == "direct" and s["steps"] == 4
    # the source of the edit is the reconstruction `p2p invert` wrote
    a, b = (np.asarray(Image.open(p).convert("RGB"), float) for p in (edit / "0.png", tmp_path / "rec.png"))
    assert np.abs(a - b).mean() <= 1.0


def test_cli_edit_of_a_photo(model, photo, scene, tmp_path):
    out = tmp_path / "e"
    assert cli(["edit", "--model", model, "--image", str(photo), "--prompt", scene[1], "--inversion", "null-text",
                "--inner-steps", "2", "--target", scene[1].replace("red", "blue"), "--out-dir", str(out), *FAST]) == 0
    s = json.loads(Image.open(out / "0.png").text["p2p"])
    assert s["image"] == str(photo) and s["inversion"] == "null-text"
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "grid.png"]


def test_cli_sweep_and_attention_of_a_saved_inversion(model, photo, scene, tmp_path):
    """`p2p sweep` and `p2p attention` start from a saved inversion like `p2p edit`: its caption is the prompt,
    its reconstruction the source; the attention maps of a photo alone are those of its reconstruction."""
    inv = tmp_path / "inv.safetensors"
    assert cli(["invert", "--model", model, "--image", str(photo), "--prompt", scene[1], "--inversion", "direct",
                "--out", str(inv), *FAST]) == 0
    target = scene[1].replace("square", "circle")
    assert cli(["sweep", "--model", model, "--inverted", str(inv), "--target", target, "--param", "cross_replace",
                "--values", "0.2,0.8", "--out", str(tmp_path / "sweep.png"), "--device", "cpu", "--quiet"]) == 0
    s = json.loads(Image.open(tmp_path / "sweep.png").text["p2p"])
    assert s["prompt"] == scene[1] and s["inversion"] == "direct" and s["inverted"] == str(inv)
    for args, prompts in (([], [scene[1]]), (["--target", target], [scene[1], target])):
        out = tmp_path / f"att{len(prompts)}.png"
        assert cli(["attention", "--model", model, "--inverted", str(inv), *args, "--res", "8", "--out", str(out),
                    "--device", "cpu", "--quiet"]) == 0
        meta = json.loads(Image.open(out).text["p2p"])
        assert meta["prompts"] == prompts and meta["inversion"] == "direct"
    assert cli(["sweep", "--model", model, "--inverted", str(inv), "--image", str(photo), "--target", target,
                "--param", "cross_replace", "--values", "0.2", "--out", str(tmp_path / "x.png"), *FAST]) == 2
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args,message", [
    (["invert", "--prompt", "a red square", "--image", "{small}", "--out", "{tmp}/x.safetensors"],
     "smaller than the model's 64x64"),
    (["invert", "--prompt", "a red square", "--image", "{tmp}/none.png", "--out", "{tmp}/x.safetensors"],
     "no image at"),
    (["edit", "--inverted", "{tmp}/none.safetensors", "--target", "a blue square", "--out-dir", "{tmp}/o"],
     "no inversion file at"),
    (["edit", "--prompt", "a red square", "--target", "a blue square", "--inversion", "ddim", "--out-dir", "{tmp}/o"],
     "--inversion needs a photo to invert"),
])
def test_cli_errors_are_one_line(model, tmp_path, capsys, args, message):
    small = noisy_image(tmp_path / "small.png", "PNG", (32, 32))
    args = [a.format(tmp=tmp_path, small=small) for a in args]
    assert cli([*args, "--model", model, *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"p2p {args[0]}: error:") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "x.safetensors").exists()
