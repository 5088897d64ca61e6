"""The SDXL UNet (Podell et al. 2023) against diffusers' UNet2DConditionModel: deep transformer stacks (several
transformer blocks per spatial transformer), attention only at the lower levels, and the "text_time"
micro-conditioning (pooled text embedding and 6 size/crop numbers added to the timestep embedding).

The two text encoders, the pipeline and the single-file layout: tests/test_sdxl.py; edits: tests/test_sdxl_p2p.py.
"""
import pytest
import torch

from models.unet import UNet, UNetConfig
from tests.tiny import reference_unet

# SDXL's topology in miniature: 3 levels, attention at levels 1 and 2 only, 1/2/3 transformer blocks per level
# (SDXL: 1/2/10, level 0's unused), per-level heads, linear projections, micro-conditioning of width 8.
TINY_XL = UNetConfig(block_out_channels=(32, 64, 64), attention_levels=(False, True, True), heads=(2, 4, 4),
                     transformer_layers=(1, 2, 3), cross_attention_dim=48, sample_size=8, use_linear_projection=True,
                     addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (sd2-sdxl.md §3.1)
SDXL = UNetConfig(block_out_channels=(320, 640, 1280), attention_levels=(False, True, True), heads=(5, 10, 20),
                  transformer_layers=(1, 2, 10), cross_attention_dim=2048, sample_size=128,
                  use_linear_projection=True, addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = reference_unet(TINY_XL)
    with torch.no_grad():
        ref.conv_out.weight.mul_(20)
    ours = UNet(TINY_XL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("shape,t", [((2, 4, 16, 16), 981), ((1, 4, 16, 16), 1), ((2, 4, 24, 16), 500)])
def test_unet_matches_diffusers(pair, shape, t):
    ref, ours = pair
    g = torch.Generator().manual_seed(1)
    b = shape[0]
    z_t, ctx = torch.randn(shape, generator=g), torch.randn(b, 77, 48, generator=g)
    pooled = torch.randn(b, 16, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 1344.0, 32.0, 0.0, 768.0, 1344.0]])[:b]
    with torch.no_grad():
        expected = ref(z_t, t, encoder_hidden_states=ctx,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(z_t, t, ctx, added=(pooled, time_ids))
        other = ours(z_t, t, ctx, added=(pooled, time_ids + 64))
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-4
    assert (other - got).abs().max() > 1e-3  # the size conditioning reaches the output


def test_sites_and_names(pair):
    ref, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(ours.sites) == 2 * (2 * 2 + 2 * 3 + 3 + 3 * 3 + 3 * 2)  # down 2x2 + 2x3, mid 3, up 3x3 + 3x2
    assert [s.index for s in ours.sites] == list(range(len(ours.sites)))
    assert "down_blocks.2.attentions.1.transformer_blocks.2.attn2" in {s.name for s in ours.sites}
    assert not any(s.name.startswith(("down_blocks.0.", "up_blocks.2.")) for s in ours.sites)


def test_sdxl_sizes():
    """2,567,463,684 parameters, 70 transformer blocks = 140 attention sites at 64x64 (10 blocks) and 32x32 (60)."""
    with torch.device("meta"):
        unet = UNet(SDXL)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert len(unet.sites) == 140
    blocks = [s for s in unet.sites if s.kind == "self"]
    assert sum(s.res == 64 for s in blocks) == 10 and sum(s.res == 32 for s in blocks) == 60


def test_micro_conditioning_is_required(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="micro-conditioned"):
        ours(torch.randn(1, 4, 16, 16), 1, torch.randn(1, 77, 48))


# --- SDXL's text towers ------------------------------------------------------------------------------------

from transformers import CLIPTextConfig as RefCLIPConfig  # noqa: E402
from transformers import CLIPTextModel as RefCLIP  # noqa: E402
from transformers import CLIPTextModelWithProjection as RefCLIPProj  # noqa: E402

from models.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402


@pytest.mark.parametrize("act,projection", [("quick_gelu", 0), ("gelu", 24)])
def test_text_towers_as_sdxl_uses_them(act, projection):
    """CLIP-L (quick-GELU, no projection) and OpenCLIP bigG (GELU, projection) in miniature: the states are
    transformers' hidden_states[-2] (no final LayerNorm), the pooled vector its text_embeds."""
    torch.manual_seed(0)
    kw = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=77, hidden_act=act)
    ref_cls = RefCLIPProj if projection else RefCLIP
    ref = ref_cls(RefCLIPConfig(**kw, projection_dim=projection or 32, eos_token_id=2)).eval()
    ours = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in kw.items() if k != "max_position_embeddings"},
                                        layer="penultimate", projection_dim=projection)).eval()
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(1, 49000, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 49406, 0, 0
    ids[0, 8], ids[1, 29] = 49407, 49407
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        states, pooled = ours.states_and_pooled(ids)
    assert (states - out.hidden_states[-2]).abs().max() <= 1e-4
    if projection:
        assert (pooled - out.text_embeds).abs().max() <= 1e-4
    else:
        assert pooled is None


def test_sgm_unet_names_are_what_diffusers_converts(pair):
    """SDXL's original (sgm) UNet names: the levels without attention, the deep transformers and label_emb map
    where diffusers' convert_ldm_unet_checkpoint puts them (our tables inverted give names it maps back exactly)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from models.checkpoint import UNET_RESNET_RENAMES, rename, unet_from_compvis, unet_prefixes

    ref, _ = pair
    up = {v: k for k, v in unet_prefixes(TINY_XL).items()}
    us = {v: k for k, v in UNET_RESNET_RENAMES.items()}
    theirs = ref.state_dict()
    sgm = {"model.diffusion_model." + rename(k, up, us): v for k, v in theirs.items()}
    assert "model.diffusion_model.label_emb.0.0.weight" in sgm
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn2.to_k.weight" in sgm
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in sgm  # the second upsampler
    back = convert_ldm_unet_checkpoint(sgm, dict(ref.config))
    assert back.keys() == theirs.keys() and all(torch.equal(back[k], v) for k, v in theirs.items())
    ours = unet_from_compvis({k.removeprefix("model.diffusion_model."): v for k, v in sgm.items()}, TINY_XL)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
