"""LDM text2img (LDMBert, WordPiece, 32x32 latents): parity with diffusers, `p2p convert`, CLI, family detection.

References are diffusers' own LDM code on random weights in the tiny-ldm config: `LDMBertModel` and
`LDMTextToImagePipeline` (diffusers.pipelines.latent_diffusion), `UNet2DConditionModel`, `AutoencoderKL`.
The pipeline is saved as the public `CompVis/ldm-text2im-large-256` folder is laid out (pickle `.bin`
weights, the VAE with the deprecated attention names), converted with `p2p convert`, and sampled by both.
"""
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig as RefLDMBertConfig
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel as RefLDMBert
from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMTextToImagePipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from models.checkpoint import CheckpointError, load_module, split_prefix, vae_from_diffusers
from models.ldmbert import LDMBertConfig, LDMBertModel
from models.presets import PRESETS
from models.unet import UNet
from models.vae import AutoencoderKL
from p2p.cli import main as cli
from p2p.core.sites import P2PDefaults, p2p_defaults
from p2p.files.convert import convert
from p2p.files.loading import read_model
from p2p.core.pipeline import Pipeline
from tests.tiny import (compvis_unet_vae, fixture_keys, load_single_file_on_meta, meta, reference_pipeline,
                        reference_unet, reference_vae, sd_betas, unet_err, update_json)

TOL = 1e-4  # fp32 max abs error on network outputs
TINY = PRESETS["tiny-ldm"]
FAST = ["--steps", "4", "--device", "cpu", "--quiet"]
PROMPT, TARGET = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"
# diffusers' own LDM pipeline test scheduler (tests/pipelines/latent_diffusion/test_latent_diffusion.py)
LDM_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                set_alpha_to_one=False)
DEPRECATED_VAE = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def reference_bert(cfg: LDMBertConfig) -> RefLDMBert:
    return RefLDMBert(RefLDMBertConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings, d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, encoder_ffn_dim=cfg.encoder_ffn_dim,
        encoder_attention_heads=cfg.encoder_attention_heads, head_dim=cfg.head_dim)).eval()


def reference_ldm(vocab_dir, cfg=TINY, seed=0, **scheduler) -> LDMTextToImagePipeline:
    from transformers import BertTokenizer

    torch.manual_seed(seed)
    unet, vae, bert = reference_unet(cfg.unet), reference_vae(cfg.vae), reference_bert(cfg.text)
    with torch.no_grad():  # PyTorch's default init leaves conv_out tiny; widen it so eps is O(1)
        unet.conv_out.weight.mul_(20)
    pipe = LDMTextToImagePipeline(vqvae=vae, bert=bert, tokenizer=BertTokenizer.from_pretrained(str(vocab_dir)),
                                  unet=unet, scheduler=DDIMScheduler(**(scheduler or LDM_DDIM)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_like_the_hub(ref: LDMTextToImagePipeline, path: Path) -> Path:
    """The public folder's layout: pickles only (bert/pytorch_model.bin), VAE attention under the old names."""
    ref.save_pretrained(path, safe_serialization=False)
    for f in (path / "bert").glob("*.safetensors"):  # transformers >= 5 writes safetensors whatever it is told
        f.unlink()
    torch.save(ref.bert.state_dict(), path / "bert" / "pytorch_model.bin")
    vae_bin = path / "vqvae" / "diffusion_pytorch_model.bin"
    sd = torch.load(vae_bin, weights_only=True)
    torch.save({old_names(k): v for k, v in sd.items()}, vae_bin)
    assert not list(path.rglob("*.safetensors"))
    return path


def old_names(key: str) -> str:
    for new, old in DEPRECATED_VAE.items():
        key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    return key


def reference_images(ref, prompt, seed, **kw) -> np.ndarray:
    out = ref(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kw).images
    return (out * 255).round().astype(np.uint8)


def mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, float) - np.asarray(b, float)).mean())


@pytest.fixture(scope="module")
def ref(bert_vocab_dir):
    return reference_ldm(bert_vocab_dir)


@pytest.fixture(scope="module")
def hub_folder(ref, tmp_path_factory):
    return save_like_the_hub(ref, tmp_path_factory.mktemp("ldm") / "ldm-pickles")


@pytest.fixture(scope="module")
def converted(hub_folder):
    dst = hub_folder.parent / "ldm-safetensors"
    assert cli(["convert", str(hub_folder), str(dst)]) == 0
    return dst


@pytest.fixture(scope="module")
def pipe(converted):
    return Pipeline.from_pretrained(converted, device="cpu")


# --- networks against diffusers ----------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY.text, LDMBertConfig(vocab_size=500, d_model=48, encoder_layers=3,
                                                          encoder_ffn_dim=96, encoder_attention_heads=4, head_dim=16)])
def test_ldmbert_matches_diffusers(cfg):
    torch.manual_seed(0)
    ref = reference_bert(cfg)
    ours = LDMBertModel(cfg).eval()
    load_module(ours, ref.state_dict(), "LDMBert")  # to_logits (unused) is dropped by name
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (3, 77), generator=g)
    ids[1, 9:] = 0  # [PAD]: attended, as in both samplers (no attention mask)
    with torch.no_grad():
        expected = ref(ids)[0]
        got = ours(ids)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= TOL


def test_ldm_unet_and_vae_match_diffusers():
    torch.manual_seed(0)
    ref_unet, ref_vae = reference_unet(TINY.unet), reference_vae(TINY.vae)
    unet, vae = UNet(TINY.unet).eval(), AutoencoderKL(TINY.vae).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    vae.load_state_dict(ref_vae.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for shape, t in (((2, 4, 8, 8), 980), ((1, 4, 12, 8), 20)):
            z_t, ctx = torch.randn(shape, generator=g), torch.randn(shape[0], 77, TINY.text.d_model, generator=g)
            expected = ref_unet(z_t, t, encoder_hidden_states=ctx).sample
            assert (unet(z_t, t, ctx) - expected).abs().max().item() <= TOL
        x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        assert (vae.posterior(x)[0] - ref_vae.encode(x).latent_dist.mean).abs().max().item() <= TOL
        z = torch.randn(1, 4, 8, 8, generator=g)
        assert (vae.decode(z) - ref_vae.decode(z / 0.18215).sample).abs().max().item() <= TOL


def test_full_size_shapes_on_meta():
    """The real model: LDMBert 581,994,042 parameters with to_logits, the UNet 872,300,484; 16 cross-attention
    sites at 32/16/8/4 for a 32x32 latent."""
    cfg = PRESETS["ldm"]
    with torch.device("meta"):
        bert, unet = LDMBertModel(cfg.text), UNet(cfg.unet)
    to_logits = cfg.text.vocab_size * cfg.text.d_model + cfg.text.vocab_size
    assert sum(p.numel() for p in bert.parameters()) + to_logits == 581_994_042
    assert sum(p.numel() for p in unet.parameters()) == 872_300_484
    cross = [s for s in unet.sites if s.is_cross]
    assert [sum(s.res == r for s in cross) for r in (32, 16, 8, 4)] == [5, 5, 5, 1]
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.shape == (320, 1280)


# --- whole generation ---------------------------------------------------------------------------------

def test_text_states_equal_diffusers(ref, pipe):
    prompts = [PROMPT, "", "a tyrannosaurus, at night!"]
    ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(pipe.tokenizer.encode(prompts), ids)
    with torch.no_grad():
        assert (pipe.encode_text(prompts) - ref.bert(ids)[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=10, guidance_scale=5.0, height=64, width=64),
    dict(num_inference_steps=6, guidance_scale=6.0, height=48, width=80),
    dict(num_inference_steps=5, guidance_scale=1.0, height=64, width=64),
])
def test_seeded_generation_equals_diffusers(ref, pipe, kw):
    expected = reference_images(ref, PROMPT, seed=3, **kw)[0]
    (got,) = pipe.generate(PROMPT, seed=3, steps=kw["num_inference_steps"], guidance=kw["guidance_scale"],
                           height=kw["height"], width=kw["width"], progress=False)
    assert expected.std() > 5  # not a flat image: the comparison means something
    assert mean_abs(got, expected) <= 1.0  # within 1/255 on average


def test_old_scheduler_config_means_what_diffusers_makes_of_it(converted, tmp_path):
    """A scheduler_config.json without steps_offset / set_alpha_to_one / clip_sample (an old diffusers export,
    as the hub folder's may be) is read as DDIMScheduler reads it: 0, true, true; the same steps follow."""
    old = tmp_path / "old"
    shutil.copytree(converted, old)
    sched = old / "scheduler" / "scheduler_config.json"
    d = json.loads(sched.read_text())
    sched.write_text(json.dumps({k: v for k, v in d.items() if k not in ("steps_offset", "set_alpha_to_one",
                                                                          "clip_sample")}))
    theirs = DDIMScheduler.from_pretrained(old / "scheduler")
    ours = Pipeline.from_pretrained(old, device="cpu").ddim
    assert (ours.cfg.steps_offset, ours.cfg.set_alpha_to_one, ours.cfg.clip_sample) == (0, True, True) == \
        (theirs.config.steps_offset, theirs.config.set_alpha_to_one, theirs.config.clip_sample)
    g = torch.Generator().manual_seed(0)
    for n in (8, 50):
        theirs.set_timesteps(n)
        assert [int(t) for t in theirs.timesteps] == ours.timesteps(n)
        z = torch.randn(1, 4, 8, 8, generator=g)
        for t in ours.timesteps(n):
            eps = torch.randn(1, 4, 8, 8, generator=g) * 5  # large enough for the clipping of z0 to act
            expected = theirs.step(eps, t, z).prev_sample
            assert (ours.step(eps, t, z, n) - expected).abs().max().item() <= 1e-6
            z = expected


def test_folder_defaults_are_the_ldm_ones(pipe):
    cfg = pipe.cfg
    assert cfg.family == "ldm" and cfg.image_size == 64 and cfg.guidance == 5.0
    # the authors' LDM choices at a native 8x8 latent: blend from 4x4 maps, self-injection and store <= 4**2
    assert p2p_defaults(cfg) == P2PDefaults(blend_res=4, self_max_res=4, store_max_res=4)
    full = PRESETS["ldm"]
    assert p2p_defaults(full) == P2PDefaults(blend_res=16, self_max_res=16, store_max_res=16) and full.image_size == 256


# --- p2p convert ----------------------------------------------------------------------------------------

def test_pickles_are_refused_at_run_time_with_the_convert_command(hub_folder):
    with pytest.raises(CheckpointError, match=r"PyTorch pickles .*p2p convert .*ldm-pickles-safetensors"):
        Pipeline.from_pretrained(hub_folder, device="cpu")


def test_converted_folder_holds_the_same_tensors(hub_folder, converted):
    assert not list(converted.rglob("*.bin")) and not list(converted.parent.glob(".*partial"))
    for sub, old, new in (("unet", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
                          ("vqvae", "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
                          ("bert", "pytorch_model.bin", "model.safetensors")):
        before = torch.load(hub_folder / sub / old, weights_only=True)
        if sub == "vqvae":
            before = vae_from_diffusers(before)  # the current attention names
        after = load_file(str(converted / sub / new))
        assert before.keys() == after.keys(), sub
        assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before), sub
        assert (converted / sub / "config.json").read_bytes() == (hub_folder / sub / "config.json").read_bytes()
    assert "to_logits.weight" in load_file(str(converted / "bert" / "model.safetensors"))
    for f in ("model_index.json", "scheduler/scheduler_config.json"):
        assert (converted / f).read_bytes() == (hub_folder / f).read_bytes()
    assert sorted(p.name for p in (converted / "tokenizer").iterdir()) == \
        sorted(p.name for p in (hub_folder / "tokenizer").iterdir())
    a, b = read_model(hub_folder, pickles=True), read_model(converted)
    assert a[0] == b[0]


def test_converted_folder_loads_in_diffusers(ref, converted):
    theirs = LDMTextToImagePipeline.from_pretrained(converted)
    for name in ("unet", "vqvae", "bert"):
        want, got = getattr(ref, name).state_dict(), getattr(theirs, name).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


class CallsSystem:
    """What a malicious checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("where", ["entry", "whole"])
def test_a_pickle_carrying_code_is_refused_and_not_run(hub_folder, tmp_path, capsys, where):
    src = tmp_path / "evil"
    shutil.copytree(hub_folder, src)
    marker = tmp_path / "it-ran"
    unet_bin = src / "unet" / "diffusion_pytorch_model.bin"
    sd = torch.load(unet_bin, weights_only=True)
    torch.save({**sd, "conv_in.weight": CallsSystem(f"touch {marker}")} if where == "entry"
               else CallsSystem(f"touch {marker}"), unet_bin)
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        convert(src, dst)
    msg = str(e.value)
    assert f"{unet_bin} is not a plain tensor file" in msg and "Nothing was run" in msg
    assert "posix.system" in msg or "system" in msg  # what it asked for
    assert cli(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2p convert: error:") and err.count("\n") == 1 and "not a plain tensor file" in err
    assert not marker.exists() and not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["evil"]


def test_a_failure_while_writing_leaves_nothing(hub_folder, tmp_path, monkeypatch):
    import p2p.files.convert as conv

    calls = []

    def failing_save(*args, **kw):
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("No space left on device")
        return save_file(*args, **kw)

    monkeypatch.setattr(conv, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        convert(hub_folder, tmp_path / "out")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_convert_refuses_an_existing_destination(hub_folder, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert cli(["convert", str(hub_folder), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


# --- the original CompVis single file (text2img-large/model.ckpt) ----------------------------------------

def ldmbert_to_compvis(key: str) -> str:
    """diffusers LDMBert name -> x-transformers name under cond_stage_model.transformer. (the table of
    shared/reference/checkpoints.md 6.2, written out here independently of models/checkpoint.py)."""
    fixed = {"model.embed_tokens.": "token_emb.", "model.embed_positions.": "pos_emb.emb.",
             "model.layer_norm.": "norm.", "to_logits.": "to_logits."}
    for new, old in fixed.items():
        if key.startswith(new):
            return old + key[len(new):]
    i, sub, param = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key).groups()
    i = int(i)
    layer = {"self_attn_layer_norm": (0, "0"), "self_attn.q_proj": (0, "1.to_q"), "self_attn.k_proj": (0, "1.to_k"),
             "self_attn.v_proj": (0, "1.to_v"), "self_attn.out_proj": (0, "1.to_out"),
             "final_layer_norm": (1, "0"), "fc1": (1, "1.net.0.0"), "fc2": (1, "1.net.2")}
    half, old = layer[sub]
    return f"attn_layers.layers.{2 * i + half}.{old}.{param}"


def to_compvis(ref: LDMTextToImagePipeline, cfg=TINY) -> dict:
    """A CompVis LDM state_dict of the reference (UNet and VAE by inverting our tables, checked against
    diffusers' converters in the test; LDMBert by the reference table above)."""
    sd = compvis_unet_vae(ref.unet, ref.vqvae, cfg)
    for k, v in ref.bert.state_dict().items():
        sd["cond_stage_model.transformer." + ldmbert_to_compvis(k)] = v
    betas = sd_betas(torch.float64)
    sd.update(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0))  # two of the DDPM buffers
    return {k: v.clone().contiguous() for k, v in sd.items()}


@pytest.fixture(scope="module")
def ckpt(ref, tmp_path_factory):
    sd = to_compvis(ref)
    path = tmp_path_factory.mktemp("compvis") / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000, "epoch": 3}, path)  # a Lightning checkpoint
    return path


def test_compvis_file_is_what_diffusers_converts(ref, ckpt):
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    unet = convert_ldm_unet_checkpoint(sd, dict(ref.unet.config))
    assert unet.keys() == ref.unet.state_dict().keys()
    assert all(torch.equal(unet[k], v) for k, v in ref.unet.state_dict().items())
    vae = convert_ldm_vae_checkpoint(sd, dict(ref.vqvae.config))
    assert all(torch.equal(vae[k].reshape(v.shape), v) for k, v in ref.vqvae.state_dict().items())


def test_compvis_single_file_converted(ref, ckpt, bert_vocab_dir, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"p2p convert .*model\.ckpt .* --tokenizer VOCAB"):
        Pipeline.from_pretrained(ckpt, tokenizer=bert_vocab_dir, config="tiny-ldm", device="cpu")
    assert cli(["convert", str(ckpt), str(tmp_path / "x"), "--model-config", "tiny-ldm"]) == 2
    assert "carries no tokenizer: pass --tokenizer" in capsys.readouterr().err
    dst = tmp_path / "ldm"
    assert cli(["convert", str(ckpt), str(dst), "--tokenizer", str(bert_vocab_dir / "vocab.txt"),
                "--model-config", "tiny-ldm"]) == 0
    assert "use it with --model" in capsys.readouterr().out
    # the networks are the reference's, tensor for tensor
    cfg, sds, tok = read_model(dst)
    assert cfg == read_model(ckpt, config="tiny-ldm", pickles=True)[0] and tok == dst / "tokenizer"
    assert set(sds["text"]) == set(ref.bert.state_dict())
    assert all(torch.equal(sds["text"][k], v) for k, v in ref.bert.state_dict().items())
    assert all(torch.equal(sds["unet"][k], v) for k, v in ref.unet.state_dict().items())
    # diffusers reads the folder we wrote (configs, scheduler, tokenizer, model_index.json) and samples what we sample
    theirs = LDMTextToImagePipeline.from_pretrained(dst)
    theirs.set_progress_bar_config(disable=True)
    assert isinstance(theirs.scheduler, DDIMScheduler)
    pipe = Pipeline.from_pretrained(dst, device="cpu")
    expected = reference_images(theirs, PROMPT, seed=2, num_inference_steps=6, guidance_scale=5.0)[0]
    (got,) = pipe.generate(PROMPT, seed=2, steps=6, progress=False)
    assert expected.std() > 5 and mean_abs(got, expected) <= 1.0


def test_real_ldm_layouts_are_consumed_completely():
    """The key lists of the real model.ckpt and of the hub folder (tests/fixtures, from the original code)."""
    cfg = PRESETS["ldm"]
    single, folder = fixture_keys("ldm_single_file_keys.json"), fixture_keys("ldm_diffusers_keys.json")
    # the x-transformers names go where the reference table puts them, at the shapes of the hub's bert/
    text = {k: v for k, v in single.items() if k.startswith("cond_stage_model.transformer.")}
    renamed = {ldmbert_to_compvis(k): v for k, v in folder["bert"].items()}
    assert renamed == split_prefix(text, "cond_stage_model.transformer.")
    modules = load_single_file_on_meta(single, cfg, LDMBertModel)
    for name, keys in (("unet", folder["unet"]), ("vae", folder["vqvae"]), ("vae", folder["vqvae_new_names"]),
                       ("text", folder["bert"])):
        load_module(modules[name], vae_from_diffusers(meta(keys)) if name == "vae" else meta(keys), name)


# --- SD v1 pickles take the same path ---------------------------------------------------------------------

def test_sd_v1_pickles_convert(clip_vocab_dir, tmp_path):
    from tests.test_loading import to_compvis as sd_to_compvis

    ref = reference_pipeline(clip_vocab_dir)
    src = tmp_path / "sd"
    ref.save_pretrained(src, safe_serialization=False)
    for f in (src / "text_encoder").glob("*.safetensors"):
        f.unlink()
    torch.save({"text_model." + k.removeprefix("text_model."): v for k, v in ref.text_encoder.state_dict().items()},
               src / "text_encoder" / "pytorch_model.bin")
    ckpt = tmp_path / "sd.ckpt"
    torch.save({"state_dict": sd_to_compvis(ref)}, ckpt)
    from_folder = convert(src, tmp_path / "a")
    from_file = convert(ckpt, tmp_path / "b", tokenizer=clip_vocab_dir / "vocab.json", config="tiny")
    z_t, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    for path in (from_folder, from_file):
        assert not list(path.rglob("*.bin"))
        pipe = Pipeline.from_pretrained(path, device="cpu")
        assert unet_err(pipe, ref, z_t, ctx) <= TOL
        with torch.no_grad():
            ids = pipe.tokenizer.encode(["a cat"])
            assert (pipe.text_encoder(ids) - ref.text_encoder(ids).last_hidden_state).abs().max().item() <= TOL


# --- the command line on an LDM folder ---------------------------------------------------------------------

def test_cli_generate(ref, converted, tmp_path):
    out = tmp_path / "squirrel.png"
    assert cli(["generate", "--model", str(converted), "--prompt", PROMPT, "--seed", "7", "--out", str(out),
                *FAST]) == 0
    img = Image.open(out)
    settings = json.loads(img.text["p2p"])
    assert settings["guidance"] == 5.0 and settings["height"] == 64  # the LDM defaults, from the folder
    expected = reference_images(ref, PROMPT, seed=7, num_inference_steps=4, guidance_scale=5.0)[0]
    assert mean_abs(img.convert("RGB"), expected) <= 1.0


def test_cli_replace_edit(converted, tmp_path):
    out = tmp_path / "edit"
    assert cli(["edit", "--model", str(converted), "--prompt", PROMPT, "--target", TARGET, "--mode", "replace",
                "--cross-replace", "0.8", "--self-replace", "0.4", "--blend", "squirrel", "lion", "--seed", "7",
                "--out-dir", str(out), *FAST]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png", "grid.png"]
    assert cli(["generate", "--model", str(converted), "--prompt", PROMPT, "--seed", "7",
                "--out", str(tmp_path / "g.png"), *FAST]) == 0
    source, edited = (np.asarray(Image.open(out / f).convert("RGB"), float) for f in ("0.png", "1.png"))
    assert mean_abs(source, Image.open(tmp_path / "g.png").convert("RGB")) <= 1.0  # the source is the generation
    assert np.abs(source - edited).max() > 0  # the edit changed something


# --- family detection ---------------------------------------------------------------------------------------

def test_ldm_folder_is_detected_without_model_index(converted, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(converted, bare)
    (bare / "model_index.json").unlink()
    assert read_model(bare)[0].family == "ldm"


@pytest.mark.parametrize("layout,message", [
    ({"unet": {}, "random": {}}, r"cannot tell which model .* holds: expected a Stable Diffusion v1 or Stable "
                                 r"Diffusion 2.x folder \(unet/, vae/, text_encoder/, tokenizer/\) or a Stable Diffusion "
                                 r"XL folder \(unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/\) or a LDM "
                                 r"text2img folder \(unet/, vqvae/, bert/, tokenizer/\); it holds random/, unet/"),
    ({"unet": {}, "vae": {}, "bert": {}}, r"cannot tell which model"),  # parts of both
    ({"model_index.json": {"_class_name": "StableDiffusionXLPipeline"}},
     r"is not a diffusers Stable Diffusion XL folder: missing unet/, vae/, text_encoder/, text_encoder_2/"),
    ({"model_index.json": {"_class_name": "KandinskyPipeline"}},
     r"holds a diffusers KandinskyPipeline; this project runs"),
    ({"model_index.json": {"_class_name": "LDMTextToImagePipeline"}, "unet": {}, "vqvae": {}},
     r"is not a diffusers LDM text2img folder: missing bert/"),
])
def test_folders_of_neither_family_are_named(tmp_path, capsys, layout, message):
    for name, content in layout.items():
        if name.endswith(".json"):
            (tmp_path / name).write_text(json.dumps(content))
        else:
            (tmp_path / name).mkdir()
    with pytest.raises(CheckpointError, match=message):
        read_model(tmp_path)
    assert cli(["generate", "--model", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("p2p generate: error:") and err.count("\n") == 1 and re.search(message, err)
    assert cli(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err) and not (tmp_path / "out").exists()


def test_text_width_mismatch_is_named(converted, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(converted, bad)
    update_json(bad / "bert" / "config.json", d_model=64)
    with pytest.raises(CheckpointError, match="cross-attends to width 32 but the text encoder is 64 wide"):
        read_model(bad)


def test_single_files_of_neither_family_and_wrong_presets_are_named(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match=r"is a LDM text2img checkpoint but is being read with a 'sd-v1' config"):
        read_model(ckpt, config="tiny", pickles=True)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match=r"is not a Stable Diffusion v1 checkpoint \(nor an LDM text2img one\)"):
        convert(other, tmp_path / "out", tokenizer=tmp_path)
    assert not (tmp_path / "out").exists()


# --- full size (slow: ~1.5B parameters twice over on the CPU, ~8 GB of RAM) ---------------------------------

@pytest.mark.slow
def test_full_size_ldmbert_and_unet_match_diffusers(bert_vocab_dir):
    """LDMBert (32 layers, 1280 wide) and the UNet (1280-wide context) of the real "ldm" preset, random
    weights, against diffusers: `pytest -m slow tests/test_ldm.py`."""
    from models.wordpiece import BertTokenizer

    cfg = PRESETS["ldm"]
    torch.manual_seed(0)
    ref = reference_bert(cfg.text)
    with torch.device("meta"):
        ours = LDMBertModel(cfg.text)
    load_module(ours, ref.state_dict(), "LDMBert")  # shares the reference's tensors
    ids = BertTokenizer.from_path(bert_vocab_dir).encode([PROMPT, ""])
    with torch.no_grad():
        ctx_ref = ref(ids)[0]
        assert (ours.eval()(ids) - ctx_ref).abs().max().item() <= TOL
    del ref, ours
    ref = reference_unet(cfg.unet)
    with torch.device("meta"):
        ours = UNet(cfg.unet)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(0)
    z_t = torch.randn(2, 4, 32, 32, generator=g)
    with torch.no_grad():
        for ctx in (ctx_ref, torch.randn(2, 77, 1280, generator=g)):
            expected = ref(z_t, 981, encoder_hidden_states=ctx).sample
            assert (ours.eval()(z_t, 981, ctx) - expected).abs().max().item() <= TOL
