"""SDXL's attention store at the default size, and inversion on SDXL (the tiny-sdxl preset: two text towers, a
pooled vector, micro-conditioning, zeroed negative prompt).

The SDXL edits are compared with the authors' controllers in tests/test_p2p_parity.py.
"""

import pytest
import torch

from models.presets import PRESETS, preset
from models.sdxl import SDXLTokenizer
from models.unet import UNet
from p2p.core.controller import GuidanceLayout
from p2p.core.inversion import invert, reconstruct
from p2p.core.run import run_edit
from p2p.core.settings import EditSettings
from p2p.core.sites import p2p_defaults
from p2p.core.store import AttentionStore
from p2p.world import scenes
from tests.tiny import tuned_for_inversion

STEPS = 10


def test_attention_store_at_1024():
    """The store's memory at SDXL's default size, measured on meta tensors (one UNet call, two prompts with CFG):
    the 60 self and 60 cross sites at 32x32, head-averaged, conditional rows, float32 running sums."""
    cfg = preset("sdxl")
    with torch.device("meta"):
        unet = UNet(cfg.unet)
        z, ctx = torch.empty(4, 4, 128, 128), torch.empty(4, 77, 2048)
        added = torch.empty(4, 1280), torch.empty(4, 6)
    store = AttentionStore(p2p_defaults(cfg).store_sites)
    store.begin_sampling(1)
    store.begin_step(0, 981, GuidanceLayout.batched(2))
    unet(z, 981, ctx, store, added=added)
    sizes = {kind: sum(m.numel() * m.element_size() for s, m in store.sums.items() if s.kind == kind)
             for kind in ("self", "cross")}
    assert len(store.sums) == 120 and {store.sizes[s] for s in store.sums} == {(32, 32)}
    assert sizes == {"self": 60 * 2 * 1024 * 1024 * 4, "cross": 60 * 2 * 1024 * 77 * 4}  # 480 MiB + 36.1 MiB


# --- inversion ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xpipe(clip_vocab_dir):
    """tiny-sdxl in float64 tuned as tests/test_inversion.py tunes tiny: unit-std latents, a small eps, text that
    matters for guidance."""
    return tuned_for_inversion(PRESETS["tiny-sdxl"], SDXLTokenizer.from_path(clip_vocab_dir), dtype=torch.float64)


def test_inversions_reconstruct(xpipe):
    """Null-text, negative-prompt and direct inversion on SDXL: the unconditional psi they start from is the zeroed
    negative prompt (token states and pooled vector), and null-text optimises both (the vector row included).
    Measured, 10 steps, mean((z_0 reconstructed - E(x))^2) / mean(E(x)^2):

        DDIM, w = 1    2.4e-4         DDIM, w = 5      8.2e-2
        null-text      2.3e-2 (3.5x better than DDIM at w = 5; SD v1's tiny model: 2.1e-2)
        negative-prompt = DDIM at w = 1               direct  1.6e-15 (exact; float64)
    """
    image, caption, _ = scenes.sample(1, 0)[0]
    runs = {"ddim@1": ("ddim", 1.0), "ddim@5": ("ddim", 5.0), "null-text": ("null-text", 5.0),
            "negative-prompt": ("negative-prompt", 5.0), "direct": ("direct", 5.0)}
    inv = {k: invert(xpipe, image, caption, m, steps=STEPS, guidance=w, progress=False) for k, (m, w) in runs.items()}
    err = {k: float((reconstruct(xpipe, i, progress=False) - i.z_0).pow(2).mean() / i.z_0.pow(2).mean())
           for k, i in inv.items()}
    print({k: f"{v:.1e}" for k, v in err.items()})
    assert err["ddim@5"] > 10 * err["ddim@1"]
    assert err["null-text"] < err["ddim@5"] / 3
    assert err["negative-prompt"] == pytest.approx(err["ddim@1"], rel=1e-3)
    assert err["direct"] < 1e-10
    phis = inv["null-text"].uncond  # (steps, 78, 80): one optimised psi per step, starting from zeros
    assert phis.shape == (STEPS, 78, 80) and phis[:, 77, :16].abs().max() > 0  # the pooled vector was optimised
    r = run_edit(xpipe, EditSettings(caption, targets=(caption.replace("square", "circle"),), steps=STEPS,
                                     guidance=5.0), inversion=inv["null-text"], progress=False)
    assert torch.allclose(r.z_0[0], reconstruct(xpipe, inv["null-text"], progress=False)[0], atol=1e-9)
