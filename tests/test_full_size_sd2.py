"""Parity at the full SD 2.1 configuration (866M-parameter UNet, 340M-parameter OpenCLIP-H text encoder), random
weights. Ours shares the reference's parameter tensors (load_state_dict(assign=True)), so each network is in
memory once: about 3.5 GB for the UNet, 1.4 GB for the text encoder, one at a time.

Slow (minutes on a CPU): `pytest -m slow tests/test_full_size_sd2.py`.
"""
import gc

import pytest
import torch
from transformers import CLIPTextConfig as RefCLIPConfig
from transformers import CLIPTextModel as RefCLIP

from models.clip import CLIPTextModel
from models.presets import PRESETS
from models.tokenizer import OpenCLIPTokenizer
from models.unet import UNet
from tests.tiny import reference_unet

pytestmark = pytest.mark.slow
SD2 = PRESETS["sd2"]


def shared(module_cls, cfg, ref_state):
    with torch.device("meta"):
        ours = module_cls(cfg)
    ours.load_state_dict(ref_state, strict=True, assign=True)
    return ours.eval()


def test_unet():
    torch.manual_seed(0)
    ref = reference_unet(SD2.unet)  # upcast_attention, linear projections, heads 5/10/20/20
    assert sum(p.numel() for p in ref.parameters()) == 865_910_724
    ours = shared(UNet, SD2.unet, ref.state_dict())
    g = torch.Generator().manual_seed(0)
    z_t, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 1024, generator=g)
    with torch.no_grad():
        expected = ref(z_t, 981, encoder_hidden_states=ctx).sample
        err = (ours(z_t, 981, ctx) - expected).abs().max().item()
    print(f"SD 2.1 UNet max abs error {err:.2e} (output max {expected.abs().max().item():.2f})")
    assert err <= 1e-4
    del ref, ours
    gc.collect()


def test_text_encoder(clip_vocab_dir):
    torch.manual_seed(0)
    t = SD2.text
    ref = RefCLIP(RefCLIPConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                                intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                                num_attention_heads=t.num_attention_heads, max_position_embeddings=77,
                                hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps)).eval()
    ours = shared(CLIPTextModel, t, {k.removeprefix("text_model."): v for k, v in ref.state_dict().items()})
    ids = OpenCLIPTokenizer.from_path(clip_vocab_dir).encode(["a photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        err = (ours(ids) - ref(ids).last_hidden_state).abs().max().item()
    print(f"OpenCLIP-H (23 layers) max abs error {err:.2e}")
    assert err <= 1e-4
