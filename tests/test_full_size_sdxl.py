"""Parity at the full SDXL base 1.0 configuration, random weights: the UNet (2.57 B parameters, 10.3 GB in fp32) with
its micro-conditioning, and both text towers (CLIP-L, 123 M; OpenCLIP bigG with projection, 695 M) as SDXL reads them.
Ours shares the reference's parameter tensors (load_state_dict(assign=True)), so each network is in memory once:
two full fp32 UNets (20 GB) would not fit this 24 GiB machine. The UNet runs at a 32x32 latent (256 px), where its
attention levels are 16x16 and 8x8; the weights and every code path are those of 1024 px.

Slow (minutes on a CPU): `pytest -m slow tests/test_full_size_sdxl.py`.
"""
import gc

import pytest
import torch
from transformers import CLIPTextConfig as RefCLIPConfig
from transformers import CLIPTextModel as RefCLIP
from transformers import CLIPTextModelWithProjection as RefCLIPProj

from models.presets import PRESETS
from models.sdxl import SDXLTextEncoder, SDXLTokenizer
from models.unet import UNet
from tests.tiny import reference_unet

pytestmark = pytest.mark.slow
SDXL = PRESETS["sdxl"]


def test_unet():
    torch.manual_seed(0)
    ref = reference_unet(SDXL.unet)
    assert sum(p.numel() for p in ref.parameters()) == 2_567_463_684
    with torch.device("meta"):
        ours = UNet(SDXL.unet)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(0)
    z_t, ctx = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 2048, generator=g)
    pooled, sizes = torch.randn(2, 1280, generator=g), torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)
    with torch.no_grad():
        expected = ref(z_t, 981, encoder_hidden_states=ctx,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample
        err = (ours(z_t, 981, ctx.clone(), added=(pooled, sizes)) - expected).abs().max().item()
    print(f"SDXL UNet max abs error {err:.2e} (output max {expected.abs().max().item():.2f})")
    assert err <= 1e-4
    del ref, ours
    gc.collect()


def test_text_towers(clip_vocab_dir):
    torch.manual_seed(0)
    refs = []
    for t, cls in ((SDXL.text.clip, RefCLIP), (SDXL.text.open_clip, RefCLIPProj)):
        refs.append(cls(RefCLIPConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
            max_position_embeddings=77, hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps,
            projection_dim=t.projection_dim or 768, eos_token_id=49407)).eval())
    with torch.device("meta"):
        ours = SDXLTextEncoder(SDXL.text)
    state = {f"text_encoder{'_2' if i else ''}.{k.removeprefix('text_model.')}": v
             for i, r in enumerate(refs) for k, v in r.state_dict().items() if not k.endswith("position_ids")}
    ours.load_state_dict(state, strict=True, assign=True)
    ids = SDXLTokenizer.from_path(clip_vocab_dir).encode_pair(["a photograph of an astronaut riding a horse", ""])
    with torch.no_grad():
        got = ours(ids)
        h_l = refs[0](ids[:, 0], output_hidden_states=True).hidden_states[-2]
        out_g = refs[1](ids[:, 1], output_hidden_states=True)
    errs = [(a - b).abs().max().item() for a, b in ((got[:, :77, :768], h_l),
                                                     (got[:, :77, 768:], out_g.hidden_states[-2]),
                                                     (got[:, 77, :1280], out_g.text_embeds))]
    print("SDXL towers max abs error: CLIP-L {:.2e}, bigG {:.2e}, pooled {:.2e}".format(*errs))
    assert max(errs) <= 1e-4
