"""Stable Diffusion 2.x against diffusers / transformers on random weights of the tiny-sd2 preset (and the real
sizes, on the meta device): the OpenCLIP-H text encoder as SD 2 uses it, the UNet with per-level heads and linear
projections, SD 2's padding, seeded generation for eps and v prediction, loading and its errors.

The full-size parity tests are in tests/test_full_size.py (slow).
"""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as RefCLIPConfig
from transformers import CLIPTextModel as RefCLIP
from transformers import CLIPTokenizer as RefTokenizer

from models.clip import CLIPTextModel
from models.presets import PRESETS
from models.tokenizer import CLIPTokenizer, OpenCLIPTokenizer
from models.unet import UNet
from models.vae import AutoencoderKL
from p2p.core.pipeline import Pipeline
from tests.tiny import (compvis_unet_vae, decode_err, fixture_keys, load_single_file_on_meta, meta, reference_pipeline,
                        reference_unet, reference_vae, save_folder, sd_betas, tiny_sd2, unet_err, update_json)

TOL = 1e-4
TINY = PRESETS["tiny-sd2"]
PROMPTS = ["a photograph of an astronaut riding a horse", "", "an oil painting of a lighthouse at dusk, dramatic sky"]


# --- networks ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet_pair():
    torch.manual_seed(0)
    ref = reference_unet(TINY.unet)
    with torch.no_grad():
        ref.conv_out.weight.mul_(20)  # an O(1) output, so the comparison means something
    ours = UNet(TINY.unet).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("shape,t", [((2, 4, 8, 8), 981), ((1, 4, 8, 8), 1), ((2, 4, 12, 10), 500)])
def test_unet_matches_diffusers(unet_pair, shape, t):
    ref, ours = unet_pair
    g = torch.Generator().manual_seed(1)
    z_t, ctx = torch.randn(shape, generator=g), torch.randn(shape[0], 77, 32, generator=g)
    with torch.no_grad():
        expected = ref(z_t, t, encoder_hidden_states=ctx).sample
        got = ours(z_t, t, ctx)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= TOL


def test_unet_layout_is_diffusers_sd2(unet_pair):
    """Per-level heads (2/4/4/4 here, SD 2: 5/10/20/20), linear projections: every name and shape as diffusers'."""
    ref, ours = unet_pair
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs
    assert theirs["down_blocks.0.attentions.0.proj_in.weight"] == (32, 32)  # Linear, not a 1x1 conv
    heads = {s.name: ours.get_submodule(s.name).heads for s in ours.sites}
    assert {n: ref.get_submodule(n).heads for n in heads} == heads
    assert heads["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == 2
    assert heads["mid_block.attentions.0.transformer_blocks.0.attn2"] == 4


def test_explicit_attention_path_equals_fused(unet_pair):
    """The path a controller takes (M materialised) equals the fused one (scaled_dot_product_attention), with upcast
    on (a no-op outside half precision: both paths stay in float64), in float64 on seeded inputs. Measured, relative
    to the output's max (22): 6e-15 here, <= 2e-13 over 5 seeds, on AVX512 and on AVX2 kernels; scaling M by 1 + 1e-6
    at the 1x1 level's cross-attention moves the output by 3e-9 or more, so 1e-10 catches a real error. In float32
    the paths differed by up to 5e-5 relative on AVX2 kernels (as much as float32 differs from float64 there): the UNet
    (x20 output) amplifies the kernels' reassociation, so float32 holds no bound that is both tight and portable."""
    from tests.test_networks import Recorder

    ours = copy.deepcopy(unet_pair[1]).double()
    g = torch.Generator().manual_seed(1)
    z_t, ctx = torch.randn(2, 4, 8, 8, generator=g).double(), torch.randn(2, 77, 32, generator=g).double()
    dtypes = set()
    rec = Recorder(replace=lambda M: dtypes.add(M.dtype) or M)
    with torch.no_grad():
        explicit, fused = ours(z_t, 981, ctx, controller=rec), ours(z_t, 981, ctx)
    assert dtypes == {torch.float64} and fused.dtype == explicit.dtype == torch.float64
    assert fused.abs().max() > 1
    assert (explicit - fused).abs().max() <= 1e-10 * fused.abs().max()
    assert [s for s, _, _ in rec.seen] == ours.sites
    assert all(shape[1] == (2 if s.level == 0 else 4) for s, shape, _ in rec.seen)  # heads per level


def test_upcast_attention_in_half_precision_as_diffusers():
    """upcast_attention: with float16 weights, Q K^T and the softmax run in float32, as diffusers' Attention with
    upcast_attention=True and its classic AttnProcessor (the path that honours the flag) computes them."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    from models.attention import CrossAttention

    torch.manual_seed(0)
    ref = Attention(64, cross_attention_dim=48, heads=4, dim_head=16, upcast_attention=True, upcast_softmax=True)
    ref.set_processor(AttnProcessor())
    ours = CrossAttention(64, 4, 48, upcast=True)
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 64, generator=g) * 20, torch.randn(2, 77, 48, generator=g) * 20
    with torch.no_grad():
        exact = ours(x, ctx)
        ref_h, ours_h = ref.half(), ours.half()
        expected, got = ref_h(x.half(), ctx.half()).float(), ours_h(x.half(), ctx.half()).float()
        got_map = ours_h(x.half(), ctx.half(), controller=_All(), hw=(4, 4)).float()
    scale = exact.abs().max()
    assert (expected - exact).abs().max() <= 1e-2 * scale  # half precision, upcast: close to float32
    assert (got - expected).abs().max() <= 1e-2 * scale and (got_map - expected).abs().max() <= 1e-2 * scale


class _All:
    def wants_map(self, site, hw):
        return True

    def on_map(self, M, site, hw):
        return M


def test_vae_matches_diffusers():
    torch.manual_seed(0)
    ref = reference_vae(TINY.vae)
    ours = AutoencoderKL(TINY.vae).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert (ours.posterior(x)[0] - ref.encode(x).latent_dist.mean).abs().max() <= TOL
        z = torch.randn(1, 4, 8, 8)
        assert (ours.decode(z) - ref.decode(z / 0.18215).sample).abs().max() <= TOL


def test_text_encoder_matches_transformers_23_layer_gelu(clip_vocab_dir):
    """SD 2's OpenCLIP-H tower as diffusers stores it: a CLIPTextModel with GELU and the final LayerNorm applied
    to the output of its last (SD 2: 23rd of 24) block; here at width 64, 3 layers, real ids with "!" padding."""
    cfg = replace(PRESETS["sd2"].text, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                  num_attention_heads=4)
    torch.manual_seed(0)
    ref = RefCLIP(RefCLIPConfig(vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=256,
                                num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu",
                                max_position_embeddings=77, layer_norm_eps=1e-5)).eval()
    ours = CLIPTextModel(cfg).eval()
    ours.load_state_dict({k.removeprefix("text_model."): v for k, v in ref.state_dict().items()}, strict=True)
    ids = OpenCLIPTokenizer.from_path(clip_vocab_dir).encode(PROMPTS)
    assert (ids[1, 2:] == 0).all()
    with torch.no_grad():
        assert (ours(ids) - ref(ids).last_hidden_state).abs().max() <= TOL


def test_sd2_sizes():
    """Parameter counts of the real configurations (sd2-sdxl.md §2.2, §2.4), and the 32 attention sites."""
    with torch.device("meta"):
        unet, text = UNet(PRESETS["sd2"].unet), CLIPTextModel(PRESETS["sd2"].text)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724
    assert sum(p.numel() for p in text.parameters()) == 340_387_840
    assert len(unet.sites) == 32 and sorted({s.res for s in unet.sites}) == [12, 24, 48, 96]
    assert [unet.get_submodule(s.name).heads for s in unet.sites if s.kind == "self"] == \
        [5, 5, 10, 10, 20, 20, 20, 20, 20, 20, 10, 10, 10, 5, 5, 5]


# --- tokenizer ---------------------------------------------------------------------------------------

def test_tokenizer_pads_with_zero_like_diffusers_sd2(clip_vocab_dir):
    ours = OpenCLIPTokenizer.from_path(clip_vocab_dir)
    ref = RefTokenizer(str(clip_vocab_dir / "vocab.json"), str(clip_vocab_dir / "merges.txt"), pad_token="!")
    prompts = PROMPTS + ["a cat, sitting on a mat (watercolor)", "word " * 80]
    with pytest.warns(UserWarning):
        got = ours.encode(prompts)
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ref.pad_token_id == 0 and torch.equal(got, expected)
    v1 = CLIPTokenizer.from_path(clip_vocab_dir).encode(["a cat"])
    assert (v1[0, 4:] == 49407).all() and (got[0, 0] == 49406)


def test_exclamation_mark_is_a_token_as_open_clip_encodes_it(clip_vocab_dir):
    """open_clip (what SD 2 was trained with) encodes "!" as "!</w>" = 256; transformers' SD 2 tokenizer turns it
    into the pad id 0 (diffusers #4153). Ours follows open_clip; word positions are unaffected either way."""
    ours = OpenCLIPTokenizer.from_path(clip_vocab_dir)
    ids = ours.encode(["a cat!"])[0]
    assert ids[:5].tolist() == [49406, 320, 2368, 256, 49407]
    assert ours.word_token_indices("a cat! sits", "sits") == [4]


# --- generation from a diffusers folder -----------------------------------------------------------------

@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def folder(request, clip_vocab_dir, tmp_path_factory):
    ref = reference_pipeline(clip_vocab_dir, cfg=tiny_sd2(request.param))
    return ref, save_folder(ref, tmp_path_factory.mktemp(f"tiny_sd2_{request.param}")), request.param


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=10, guidance_scale=7.5, height=128, width=128),
    dict(num_inference_steps=10, guidance_scale=7.5, height=64, width=64),
    dict(num_inference_steps=6, guidance_scale=4.0, height=48, width=80),
])
def test_seeded_generation_equals_diffusers(folder, kw):
    """Measured (mean abs / 255): 0 in all six cases, on AVX512 and on AVX2 kernels. Before the weights read from
    safetensors were copied into aligned memory (test_unet_read_from_a_folder_is_bit_identical_to_diffusers), 64 px
    gave eps 0.0001 / 0.0002, v 0.76 / 1.013 (AVX512 / AVX2): the random v sampler grows a 1e-7 difference at the
    1x1 level to 0.36 in z_0."""
    ref, path, prediction = folder
    pipe = Pipeline.from_pretrained(path, device="cpu")
    assert pipe.cfg.family == "sd-v2" and pipe.cfg.ddim.prediction_type == prediction
    assert isinstance(pipe.tokenizer, OpenCLIPTokenizer)
    prompt = "a photograph of an astronaut riding a horse"
    out = ref(prompt, generator=torch.Generator("cpu").manual_seed(3), output_type="np", **kw).images[0]
    expected = (out * 255).round()
    (got,) = pipe.generate(prompt, seed=3, steps=kw["num_inference_steps"], guidance=kw["guidance_scale"],
                           height=kw["height"], width=kw["width"], progress=False)
    assert expected.std() > 5
    assert np.abs(np.asarray(got, float) - expected).mean() <= 1.0
    with torch.no_grad():
        text, _ = ref.encode_prompt(PROMPTS, "cpu", 1, False)
        assert (pipe.encode_text(PROMPTS) - text).abs().max() <= TOL


def test_unet_read_from_a_folder_is_bit_identical_to_diffusers(folder):
    """At 64 px the lowest level is 1x1, where a 1x1 conv (conv_shortcut) is a matrix-vector product whose rounding
    depends on the weight's address. safetensors hands tensors out at unaligned addresses; read_tensors copies them into
    PyTorch's 64-byte aligned memory, where a module built in memory (diffusers') has them. Measured: 0 at the
    output, on AVX512 and AVX2 kernels; unaligned, 1.7e-5 (AVX2: 3.2e-5) of outputs up to 25."""
    ref, path, _ = folder
    pipe = Pipeline.from_pretrained(path, device="cpu")
    assert all(p.data_ptr() % 64 == 0 for p in pipe.unet.parameters())
    g = torch.Generator().manual_seed(2)
    z_t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        expected = ref.unet(z_t, torch.tensor(901), encoder_hidden_states=ctx).sample
        assert torch.equal(pipe.unet(z_t, torch.tensor(901), ctx), expected)


# --- loading: the real layouts, a single file in open_clip's layout, errors -------------------------------

import json  # noqa: E402

from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,  # noqa: E402
                                                 convert_open_clip_checkpoint)
from safetensors.torch import save_file  # noqa: E402

from models.checkpoint import (CheckpointError, clip_from_open_clip, load_module, split_prefix,  # noqa: E402
                               unet_from_compvis, vae_from_diffusers)
from p2p.cli import main as cli  # noqa: E402
from p2p.files.loading import split_single_file  # noqa: E402
from tests.open_clip_ref import open_clip_modules, sd2_text_states  # noqa: E402

SD2 = PRESETS["sd2"]


def test_real_sd2_single_file_is_consumed_completely():
    keys = fixture_keys("sd2_single_file_keys.json")
    assert len(keys) == 1242  # UNet 686 + VAE 248 + open_clip 294 + DDPM 12 + model_ema 2 (byte-exact, see _meta)
    for name in ("sd2", "sd2-base"):
        load_single_file_on_meta(keys, PRESETS[name], CLIPTextModel)


def test_real_sd2_diffusers_folder_is_consumed_completely():
    keys = fixture_keys("sd2_diffusers_keys.json")
    with torch.device("meta"):
        load_module(UNet(SD2.unet), meta(keys["unet"]), "UNet")
        load_module(AutoencoderKL(SD2.vae), vae_from_diffusers(meta(keys["vae"])), "VAE")
        load_module(CLIPTextModel(SD2.text), split_prefix(meta(keys["text_encoder"]), "text_model."), "text encoder")


def test_our_sd2_mapping_equals_diffusers_on_the_real_layout():
    """Every real UNet key goes where convert_ldm_unet_checkpoint puts it, every open_clip key where
    convert_open_clip_checkpoint does (q/k/v split rows included), block 23 and the projection dropped."""
    keys = fixture_keys("sd2_single_file_keys.json")
    full = ("in_proj", "text_projection")  # tensors whose values (split rows) or shape (its width) matter
    tagged = {k: torch.arange(float(i), i + torch.Size(s).numel()).reshape(s) if len(s) <= 1 or k.endswith(full)
              or "in_proj" in k else torch.tensor([float(i)]) for i, (k, s) in enumerate(keys.items())}
    unet = {k: v for k, v in tagged.items() if k.startswith("model.diffusion_model.")}
    with torch.device("meta"):
        unet_cfg = dict(reference_unet(SD2.unet).config)
        text_model = RefCLIP(RefCLIPConfig(**{k: getattr(SD2.text, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act")}))
    ours = unet_from_compvis(split_prefix(unet, "model.diffusion_model."), SD2.unet)
    theirs = convert_ldm_unet_checkpoint(unet, unet_cfg)
    assert {k: v.flatten()[0].item() for k, v in ours.items()} == {k: v.flatten()[0].item() for k, v in theirs.items()}
    text = {k: v for k, v in tagged.items() if k.startswith("cond_stage_model.model.")}
    ours = clip_from_open_clip(split_prefix(text, "cond_stage_model.model."), SD2.text.num_hidden_layers)
    theirs = {k.removeprefix("text_model."): v for k, v in convert_open_clip_checkpoint(text_model, text).items()}
    assert ours.keys() == theirs.keys() and len(ours) == 372
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


@pytest.fixture(scope="module")
def tiny_single_file(clip_vocab_dir, tmp_path_factory):
    """A tiny SD 2 single file: UNet and VAE of a diffusers reference in CompVis names (the inverse of our tables,
    checked against diffusers' converter), the text tower a real open_clip TextTransformer with one block more than
    SD 2 uses, its projection and a logit_scale. Returns (reference pipeline, open_clip tower, path)."""
    oc = open_clip_modules()
    if oc is None:
        pytest.skip("open_clip_torch is not installed")
    ref = reference_pipeline(clip_vocab_dir, cfg=TINY)
    torch.manual_seed(1)
    tower = oc[0].TextTransformer(context_length=77, vocab_size=49408, width=32, heads=4, layers=3, mlp_ratio=2,
                                  output_dim=32).eval()
    sd = compvis_unet_vae(ref.unet, ref.vae, TINY)
    sd.update({"cond_stage_model.model." + k: v for k, v in tower.state_dict().items()})
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
    sd["betas"] = sd_betas()
    assert convert_ldm_unet_checkpoint(sd, dict(ref.unet.config)).keys() == ref.unet.state_dict().keys()
    path = tmp_path_factory.mktemp("sd2_single") / "tiny-sd2-512.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return ref, tower, path


def test_tiny_single_file_matches_diffusers_and_open_clip(tiny_single_file, clip_vocab_dir):
    ref, tower, path = tiny_single_file
    pipe = Pipeline.from_pretrained(path, tokenizer=clip_vocab_dir, config="tiny-sd2", device="cpu")
    assert pipe.cfg.family == "sd-v2" and isinstance(pipe.tokenizer, OpenCLIPTokenizer)
    g = torch.Generator().manual_seed(0)
    # 16x16: at 8x8 the mid block's GroupNorm sees 1x1 maps, 2 values per group, and amplifies float rounding
    z_t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    ids = pipe.tokenizer.encode(PROMPTS)
    assert unet_err(pipe, ref, z_t, ctx) <= TOL and decode_err(pipe, ref, z_t) <= TOL
    with torch.no_grad():
        # open_clip's own forward, cut after the penultimate block and layer-normed as SD 2 does
        assert (pipe.text_encoder(ids) - sd2_text_states(tower, ids)).abs().max() <= TOL


def test_tokenizer_equals_open_clip_tokenize(clip_vocab_dir):
    oc = open_clip_modules()
    if oc is None:
        pytest.skip("open_clip_torch is not installed")
    prompts = PROMPTS + ["a cat! a dog!! (watercolor)", "! !! !!!"]
    expected = oc[1].tokenize(prompts)
    assert torch.equal(OpenCLIPTokenizer.from_path(clip_vocab_dir).encode(prompts), expected)


def test_sd2_file_read_as_sd_v1_and_the_reverse(tiny_single_file, clip_vocab_dir, tmp_path):
    _, _, path = tiny_single_file
    with pytest.raises(CheckpointError, match="is a Stable Diffusion 2.x checkpoint but is being read with a "
                                              "'sd-v1' config"):
        Pipeline.from_pretrained(path, tokenizer=clip_vocab_dir, config="tiny", device="cpu")
    v1 = fixture_keys("sd_v1_single_file_keys.json")
    with pytest.raises(CheckpointError, match="is a Stable Diffusion v1 checkpoint but is being read with a "
                                              "'sd-v2' config"):
        split_single_file(meta(v1), SD2)


def test_sd2_single_file_size_comes_from_the_name_or_the_config(tiny_single_file, clip_vocab_dir, tmp_path):
    _, _, path = tiny_single_file
    anon = tmp_path / "model.safetensors"
    anon.symlink_to(path)
    with pytest.raises(CheckpointError, match="do not say whether it is the 512 px eps model or the 768 px "
                                              "v-prediction model.*--model-config sd2-base .* or sd2"):
        Pipeline.from_pretrained(anon, tokenizer=clip_vocab_dir, device="cpu")
    named = tmp_path / "v2-1_768-ema-pruned.safetensors"
    named.symlink_to(path)
    with pytest.raises(CheckpointError, match="named as the 768 px Stable Diffusion 2.x model, which predicts "
                                              "'v_prediction', but the config given says 'epsilon'"):
        Pipeline.from_pretrained(named, tokenizer=clip_vocab_dir, config="tiny-sd2", device="cpu")


def test_v_model_with_an_eps_scheduler_config(clip_vocab_dir, tmp_path):
    """A 768 px SD 2 folder (unet sample_size 96) whose scheduler says epsilon (as early 2.0 configs lacked
    prediction_type): one error naming the fix; `p2p generate` prints it as one line."""
    save_folder(reference_pipeline(clip_vocab_dir, cfg=TINY), tmp_path)
    update_json(tmp_path / "unet" / "config.json", sample_size=96)
    with pytest.raises(CheckpointError, match="prediction_type 'epsilon', but a 768 px Stable Diffusion 2.x model "
                                              "predicts 'v_prediction'.*\"prediction_type\": \"v_prediction\""):
        Pipeline.from_pretrained(tmp_path, device="cpu")


def test_cli_prints_one_line(clip_vocab_dir, tmp_path, capsys):
    save_folder(reference_pipeline(clip_vocab_dir, cfg=TINY), tmp_path / "m")
    sched = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    update_json(tmp_path / "m" / "unet" / "config.json", sample_size=96)
    assert json.loads(sched.read_text())["prediction_type"] == "epsilon"
    capsys.readouterr()  # diffusers' progress bars while saving
    assert cli(["generate", "--model", str(tmp_path / "m"), "--prompt", "a cat", "--steps", "1", "--device", "cpu",
                "--out", str(tmp_path / "x.png"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "v_prediction" in err and "Traceback" not in err


# --- Prompt-to-Prompt defaults and the manifest ------------------------------------------------------------

def test_p2p_defaults_select_the_authors_layers_at_768():
    """At 768 px the authors' 16x16 rule becomes the latent/4 level, 24x24: the same 5 cross-attention layers blend
    (down_blocks.2, up_blocks.1), the same 6 self-attention layers take the injection (24x24 and the 12x12 mid)."""
    from p2p.core.sites import p2p_defaults

    for name, grid in (("sd2", 24), ("sd2-base", 16)):
        cfg = PRESETS[name]
        with torch.device("meta"):
            sites = UNet(cfg.unet).sites
        d = p2p_defaults(cfg)
        hw = lambda s: (s.res, s.res)  # noqa: E731  (at the native size)
        blend = [s.name for s in sites if d.blend_sites.selects(s, hw(s))]
        assert len(blend) == 5 and all(n.startswith(("down_blocks.2.", "up_blocks.1.")) for n in blend)
        injected = [s for s in sites if s.kind == "self" and d.self_sites.selects(s, hw(s))]
        assert len(injected) == 6 and {s.res for s in injected} == {grid, grid // 2}
        stored = {s.res for s in sites if d.store_sites.selects(s, hw(s))}
        assert stored == ({24, 12} if name == "sd2" else {32, 16, 8})


def test_manifest_has_the_public_sd2_files_with_the_reference_hashes(capsys):
    from p2p.files.download import load_manifest

    m = load_manifest()
    single = {"sd2-1": "dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
              "sd2-1-base": "df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2"}
    for name, sha in single.items():
        (f,) = m[name]["files"]
        assert m[name]["family"] == "sd-v2" and f["sha256"] == sha and f["size"] == 5_214_604_494
    for name in ("sd2-1-diffusers", "sd2-1-base-diffusers"):
        weights = {f["path"]: f["sha256"] for f in m[name]["files"] if f["path"].endswith(".safetensors")}
        assert weights["text_encoder/model.safetensors"].startswith("cce6febb")
        assert weights["vae/diffusion_pytorch_model.safetensors"].startswith("a1d99348")
    assert cli(["download", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("sd2-1", "sd2-1-base", "sd2-1-diffusers", "sd2-1-base-diffusers"))


def test_convert_single_file_to_a_folder_that_loads_as_sd2(tiny_single_file, clip_vocab_dir, tmp_path):
    from p2p.files.convert import convert

    ref, _, path = tiny_single_file
    out = convert(path, tmp_path / "folder", tokenizer=clip_vocab_dir, config="tiny-sd2")
    pipe = Pipeline.from_pretrained(out, device="cpu")
    assert pipe.cfg == Pipeline.from_pretrained(path, tokenizer=clip_vocab_dir, config="tiny-sd2", device="cpu").cfg
    assert pipe.cfg.family == "sd-v2" and isinstance(pipe.tokenizer, OpenCLIPTokenizer)
    assert unet_err(pipe, ref, torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), t=500) <= TOL


def test_fp16_variant_and_dtypes(folder_eps, tmp_path):
    """A diffusers SD 2 folder with `.fp16.` weights: variant="fp16" reads them, dtype casts them."""
    from safetensors.torch import load_file

    ref, path = folder_eps
    unet_file = path / "unet" / "diffusion_pytorch_model.safetensors"
    half = {k: (v * 0.5).half() for k, v in load_file(str(unet_file)).items()}
    save_file(half, str(path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    try:
        fp16 = Pipeline.from_pretrained(path, device="cpu", variant="fp16", dtype="float32")
        assert fp16.cfg.family == "sd-v2" and torch.equal(fp16.unet.conv_in.weight, half["conv_in.weight"].float())
        bf16 = Pipeline.from_pretrained(path, device="cpu", dtype="bfloat16")
        assert bf16.unet.conv_in.weight.dtype == torch.bfloat16
        assert torch.equal(bf16.unet.conv_in.weight, ref.unet.conv_in.weight.bfloat16())
    finally:
        (path / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()


@pytest.fixture(scope="module")
def folder_eps(clip_vocab_dir, tmp_path_factory):
    ref = reference_pipeline(clip_vocab_dir, cfg=TINY)
    return ref, save_folder(ref, tmp_path_factory.mktemp("tiny_sd2_variant"))


def test_folder_without_scheduler_config_takes_the_preset_of_its_size(folder_eps, tmp_path):
    """No scheduler/: a 512 px SD 2 folder samples as sd2-base (eps), a 768 px one as sd2 (v)."""
    import shutil

    _, path = folder_eps
    copy = tmp_path / "m"
    shutil.copytree(path, copy)
    shutil.rmtree(copy / "scheduler")
    for side, prediction in ((64, "epsilon"), (96, "v_prediction"), (8, "v_prediction")):
        update_json(copy / "unet" / "config.json", sample_size=side)
        assert Pipeline.from_pretrained(copy, device="cpu").cfg.ddim.prediction_type == prediction
