"""Stable Diffusion 2.x against diffusers / transformers on random weights of the tiny-sd2 preset (and the real
sizes, on the meta device): the OpenCLIP-H text encoder as SD 2 uses it, the UNet with per-level heads and linear
projections, SD 2's padding, seeded generation for eps and v prediction, loading and its errors.

The full-size parity tests are in tests/test_full_size.py (slow).
"""
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig as RefCLIPConfig
from transformers import CLIPTextModel as RefCLIP
from transformers import CLIPTokenizer as RefTokenizer

from models.clip import CLIPTextModel
from models.ddim import DDIMConfig
from models.presets import PRESETS
from models.tokenizer import CLIPTokenizer, OpenCLIPTokenizer
from models.unet import UNet
from models.vae import AutoencoderKL
from p2p.core.pipeline import Pipeline
from tests.tiny import reference_pipeline, reference_unet, reference_vae

TOL = 1e-4
TINY = PRESETS["tiny-sd2"]
TINY_V = replace(TINY, ddim=DDIMConfig(prediction_type="v_prediction"))
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
    """The path a controller takes (M materialised) equals the fused one, with upcast on."""
    from tests.test_networks import Recorder

    _, ours = unet_pair
    z_t, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    rec = Recorder()
    with torch.no_grad():
        explicit, fused = ours(z_t, 981, ctx, controller=rec), ours(z_t, 981, ctx)
    assert (explicit - fused).abs().max() <= 1e-5 * fused.abs().max()  # float reassociation (outputs ~10 here)
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
    cfg = TINY if request.param == "epsilon" else TINY_V
    ref = reference_pipeline(clip_vocab_dir, cfg=cfg)
    path = tmp_path_factory.mktemp(f"tiny_sd2_{request.param}")
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path, request.param


@pytest.mark.parametrize("kw", [
    dict(num_inference_steps=10, guidance_scale=7.5, height=64, width=64),
    dict(num_inference_steps=6, guidance_scale=4.0, height=48, width=80),
])
def test_seeded_generation_equals_diffusers(folder, kw):
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
