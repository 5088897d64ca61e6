"""Our UNet, VAE, CLIP text encoder and attention against diffusers / transformers on random weights.

The references are independent implementations; weights are copied from them into ours by name
(the names are the checkpoint names), so any difference is a difference of computation.
"""
import math

import pytest
import torch
from diffusers import AutoencoderKL as RefVAE
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig as RefCLIPConfig
from transformers import CLIPTextModel as RefCLIP

from models.attention import CrossAttention, Site
from models.clip import CLIPTextConfig, CLIPTextModel
from models.presets import PRESETS
from models.unet import UNet, UNetConfig
from models.vae import AutoencoderKL, VAEConfig
from p2p.core.controller import Controller

TOL = 1e-4  # fp32 max abs error on network outputs (issue 2)


def diffusers_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple(t.replace("Down", "Up") for t in reversed(down))
    return UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, cross_attention_dim=cfg.cross_attention_dim,
        attention_head_dim=cfg.heads, norm_num_groups=cfg.norm_num_groups).eval()


@pytest.fixture(scope="module")
def unet_pair():
    cfg = PRESETS["tiny"].unet
    torch.manual_seed(0)
    ref = diffusers_unet(cfg)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


class Recorder:
    """The UNet's side of the contract (models.attention.AttentionController), with no guidance layout: wants
    every site (or those passing `select`), records what it saw, returns M unchanged or replaced."""

    def __init__(self, select=lambda s: True, replace=None):
        self.select, self.replace, self.seen = select, replace, []

    def wants_map(self, site, hw):
        return self.select(site)

    def on_map(self, M, site, hw):
        self.seen.append((site, tuple(M.shape), hw))
        return M if self.replace is None else self.replace(M)


@pytest.mark.parametrize("shape,t", [((2, 4, 8, 8), 981), ((1, 4, 8, 8), 1), ((2, 4, 13, 11), 500)])
def test_unet_matches_diffusers(unet_pair, shape, t):
    ref, ours = unet_pair
    g = torch.Generator().manual_seed(1)
    z_t, ctx = torch.randn(shape, generator=g), torch.randn(shape[0], 77, 32, generator=g)
    with torch.no_grad():
        expected = ref(z_t, t, encoder_hidden_states=ctx).sample
        got = ours(z_t, t, ctx)
    assert expected.abs().max() > 0.1  # a non-trivial output
    assert (got - expected).abs().max().item() <= TOL


def test_unet_per_sample_timesteps(unet_pair):
    ref, ours = unet_pair
    z_t, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.tensor([981, 21])
    with torch.no_grad():
        assert (ours(z_t, t, ctx) - ref(z_t, t, encoder_hidden_states=ctx).sample).abs().max() <= TOL


def test_controller_asking_for_nothing_is_bit_identical(unet_pair):
    _, ours = unet_pair
    z_t, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        assert torch.equal(ours(z_t, 981, ctx, controller=Controller()), ours(z_t, 981, ctx))


def test_explicit_attention_path_equals_fused_and_controller_sees_every_site(unet_pair):
    _, ours = unet_pair
    z_t, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    rec = Recorder()
    with torch.no_grad():
        explicit, fused = ours(z_t, 981, ctx, controller=rec), ours(z_t, 981, ctx)
    assert (explicit - fused).abs().max() <= 1e-5
    assert [s for s, _, _ in rec.seen] == ours.sites  # every site once, in forward order
    for site, shape, hw in rec.seen:
        n = hw[0] * hw[1]
        assert hw == (8 >> site.level, 8 >> site.level)
        assert shape == (2, 4, n, 77 if site.is_cross else n)  # (batch, heads, queries, keys)


def test_controller_replacement_is_used(unet_pair):
    """Uniform cross-attention maps: the output must change, and only cross sites were asked."""
    _, ours = unet_pair
    z_t, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    rec = Recorder(select=lambda s: s.is_cross, replace=lambda M: torch.full_like(M, 1 / M.shape[-1]))
    with torch.no_grad():
        edited, plain = ours(z_t, 981, ctx, controller=rec), ours(z_t, 981, ctx)
    assert len(rec.seen) == 16 and all(s.is_cross for s, _, _ in rec.seen)
    assert (edited - plain).abs().max() > 1e-3


def test_cross_attention_by_hand():
    """M = softmax(Q K^T / sqrt(d)), out = to_out(M V), computed here with explicit loops over heads."""
    torch.manual_seed(0)
    site = Site("x", "down", "cross", 0, 8, 1, 0)
    attn = CrossAttention(16, 2, context_dim=12, site=site).eval()
    x, ctx = torch.randn(1, 5, 16), torch.randn(1, 7, 12)
    q, k, v = attn.to_q(x)[0], attn.to_k(ctx)[0], attn.to_v(ctx)[0]
    heads = []
    for h in range(2):
        sl = slice(8 * h, 8 * h + 8)
        M = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(8), dim=-1)
        heads.append(M @ v[:, sl])
    expected = attn.to_out[0](torch.cat(heads, dim=-1))[None]
    with torch.no_grad():
        assert torch.allclose(attn(x, ctx), expected, atol=1e-6)
        assert torch.allclose(attn(x, ctx, controller=Recorder(), hw=(5, 1)), expected, atol=1e-6)


def test_sd_v1_sites():
    """32 attention layers in 16 transformer blocks: 5 at 64x64, 5 at 32x32, 5 at 16x16, 1 (mid) at 8x8."""
    with torch.device("meta"):
        unet = UNet(PRESETS["sd-v1"].unet)
    sites = unet.sites
    assert len(sites) == 32 and [s.index for s in sites] == list(range(32))
    blocks = [s for s in sites if s.kind == "self"]
    assert [sum(s.res == r for s in blocks) for r in (64, 32, 16, 8)] == [5, 5, 5, 1]
    assert [s.place for s in blocks] == ["down"] * 6 + ["mid"] + ["up"] * 9
    names = set(unet.state_dict())
    assert all(f"{s.name}.to_q.weight" in names for s in sites)
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # the SD v1 UNet's parameter count


def test_vae_matches_diffusers():
    cfg = VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=2)
    torch.manual_seed(0)
    ref = RefVAE(block_out_channels=cfg.block_out_channels, layers_per_block=2, latent_channels=4,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3).eval()
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.posterior(x)
        assert (mean - dist.mean).abs().max() <= TOL and (logvar - dist.logvar).abs().max() <= TOL
        assert (ours.encode(x) - dist.mean * 0.18215).abs().max() <= TOL
        z = torch.randn(2, 4, 8, 8)
        assert (ours.decode(z) - ref.decode(z / 0.18215).sample).abs().max() <= TOL


def test_vae_parameter_count():
    with torch.device("meta"):
        vae = AutoencoderKL(PRESETS["sd-v1"].vae)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_text_encoder_matches_transformers(act):
    torch.manual_seed(0)
    ref = RefCLIP(RefCLIPConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                                bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    ours = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                        num_attention_heads=4, hidden_act=act)).eval()
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items() if "position_ids" not in k}
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).last_hidden_state).abs().max() <= TOL


def test_clip_parameter_count():
    with torch.device("meta"):
        clip = CLIPTextModel(PRESETS["sd-v1"].text)
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480
