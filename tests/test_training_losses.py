"""The embedded model's optional training losses, against hand computations: Min-SNR-gamma weights, the
grounding loss of the cross-attention maps and the context loss of the text states (p2p/world/grounding.py),
and the VAE's reconstruction loss (with the scale-equivariance term)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.presets import preset
from models.tokenizer import CLIPTokenizer
from models.unet import UNet
from p2p.files.loading import EMBEDDED_DIR
from p2p.world import grounding, scenes
from p2p.world.train import snr_weights


def test_min_snr_weights_make_the_z0_weight_min_snr_gamma():
    alpha_bar = torch.tensor([1e-4, 0.01, 0.2, 0.5, 0.9, 0.999])
    snr = alpha_bar / (1 - alpha_bar)
    # ||v - v_hat||^2 = (SNR + 1) ||z0 - z0_hat||^2 and ||eps - eps_hat||^2 = SNR ||z0 - z0_hat||^2
    for kind, factor in (("v_prediction", snr + 1), ("epsilon", snr)):
        torch.testing.assert_close(snr_weights(alpha_bar, 5.0, kind) * factor, snr.clamp(max=5.0))
    assert snr_weights(torch.tensor([0.0]), 5.0, "v_prediction").item() == 0.0  # zero terminal SNR: no NaN


def test_token_owners_follow_the_caption_and_the_tokenizer():
    tok = CLIPTokenizer.from_path(EMBEDDED_DIR / "tokenizer")
    caption = "a big red striped square and a small blue circle on a green background"
    ids, owners = tok.encode([caption])[0], grounding.token_owners([caption])[0]
    words = {int(i): w for w in scenes.vocabulary() for i in tok.encode([w])[0][1:2]}
    got = {(words[int(i)], int(o)) for i, o in zip(ids, owners) if o >= 0}
    assert got == {("big", 0), ("red", 0), ("striped", 0), ("square", 0), ("small", 1), ("blue", 1), ("circle", 1)}
    assert (owners >= 0).sum() == 7  # "a", "and", "on", the background's words, start/end: not grounded


def test_grounding_loss_is_the_mass_outside_the_disc():
    # one thing at the centre of a 64 px image, radius 10 px; a 4x4 map (16 px cells): the disc grown by half a
    # cell (8 px) holds the 4 central cells, whose centres are 11.3 px from the image's centre
    discs = torch.tensor([[[32.0, 32.0, 10.0], [0.0, 0.0, 0.0]]])
    inside = grounding.disc_masks(discs, (4, 4), 64)[0, 0].view(4, 4)
    assert inside.sum() == 4 and inside[1:3, 1:3].all()
    owners = torch.full((1, 5), -1)
    owners[0, 1] = 0  # token 1 describes thing 0; the others are not grounded
    M = torch.zeros(1, 2, 16, 5)
    M[..., 0] = 1.0  # every query attends to token 0 only ...
    center = inside.flatten().bool()
    M[0, 0, center, 0], M[0, 0, center, 1] = 0.5, 0.5  # ... but head 0's central queries give token 1 half
    M[0, 1, ~center, 0], M[0, 1, ~center, 1] = 0.75, 0.25  # head 1: a quarter of the outer ones
    # token 1's mass, averaged over heads: 4 cells x 0.25 inside, 12 cells x 0.125 outside
    share = 1.0 / (1.0 + 1.5)
    loss = grounding.grounding_loss([(M, (4, 4))], owners, discs, torch.tensor([True]), 64)
    assert math.isclose(loss.item(), (1 - share) ** 2, rel_tol=1e-6)
    assert grounding.grounding_loss([(M, (4, 4))], owners, discs, torch.tensor([False]), 64).item() == 0.0


def test_recorder_sees_the_grounded_maps_with_their_gradient():
    cfg = preset("embedded")
    torch.manual_seed(0)
    unet = UNet(cfg.unet)
    z = torch.randn(2, cfg.unet.in_channels, 16, 16)
    context = torch.randn(2, 77, cfg.unet.cross_attention_dim)
    rec = grounding.MapRecorder()
    out = unet(z, torch.tensor([10, 500]), context, rec)
    assert sorted({hw for _, hw in rec.maps}) == [(8, 8), (16, 16)]
    assert all(M.shape[-1] == 77 and M.requires_grad for M, _ in rec.maps)
    torch.testing.assert_close(out, unet(z, torch.tensor([10, 500]), context))  # recording changes nothing
    rec.maps[0][0].sum().backward()
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.weight.grad is not None


@pytest.mark.parametrize("weight", [0.0, 0.05])
def test_training_step_with_the_new_losses_runs(tmp_path, weight):
    from p2p.world import train
    cfg = train.EMBEDDED
    captions = [scenes.caption(s) for _, _, s in scenes.sample(4, 0)]
    tok = CLIPTokenizer.from_path(EMBEDDED_DIR / "tokenizer")
    discs = torch.tensor([[[20.0, 20.0, 8.0], [0.0, 0.0, 0.0]]]).expand(4, 2, 3).clone()
    latents = torch.randn(4, cfg.unet.in_channels, 16, 16)
    train.train_diffusion(cfg, latents, tok.encode(captions), tok.encode([""])[0], tmp_path, steps=2, batch=4,
                          lr=1e-4, seed=0, min_snr_gamma=5.0, ground_weight=weight,
                          owners=grounding.token_owners(captions), discs=discs)
    rows = (tmp_path / "diffusion_log.jsonl").read_text() if (tmp_path / "diffusion_log.jsonl").exists() else ""
    assert (tmp_path / "diffusion.pt").is_file() and rows == ""  # logs every 50 steps; checkpoint at the end


def test_vae_reconstruction_loss_is_the_weighted_mean_of_l1_plus_l2():
    from p2p.world.train import weighted_l1_l2
    x = torch.zeros(1, 1, 2, 2)
    rec = torch.tensor([[[[0.5, -1.0], [0.0, 2.0]]]])
    w = torch.tensor([[[[10.0, 1.0], [1.0, 1.0]]]])
    # |err| + err^2 per pixel: 0.75, 2, 0, 6; weighted mean (7.5 + 2 + 0 + 6) / 13
    assert math.isclose(weighted_l1_l2(rec, x, w).item(), 15.5 / 13, rel_tol=1e-6)
    assert math.isclose(weighted_l1_l2(rec, x, torch.ones(1)).item(), 8.75 / 4, rel_tol=1e-6)


def test_vae_step_with_scale_equivariance_runs_and_logs_it(tmp_path):
    """Both shrink factors (2, 4) with the things' pixel weights; the loss of the shrunk decoding is logged."""
    from dataclasses import replace
    from p2p.world import train
    items = scenes.sample(4, 0)
    images = torch.stack([torch.from_numpy(np.array(img)).permute(2, 0, 1) for img, _, _ in items])
    discs = torch.tensor([[[20.0, 20.0, 8.0], [0.0, 0.0, 0.0]]]).expand(4, 2, 3).clone()
    cfg = replace(train.EMBEDDED, vae=replace(train.EMBEDDED.vae, latent_channels=8))
    train.train_vae(cfg, images, tmp_path, steps=50, batch=2, lr=1e-3, seed=0, discs=discs, object_weight=10.0,
                    scale_equivariance=1.0)
    row = json.loads((tmp_path / "vae_log.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 50 and 0 < row["se"] < 10


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_vae_bf16_defaults_to_the_cpus_native_bf16():
    """--vae-bf16's default follows the CPU, read here from the kernel's flags rather than torch's detection:
    emulated bf16 took a VAE step 8x as long as float32 on an AVX2 CPU."""
    from p2p.world import train
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert train.native_bf16() == bool(flags & {"avx512_bf16", "amx_tile", "amx_bf16"})


def test_vae_from_a_model_folder_starts_the_vae_stage(tmp_path):
    """--vae-from: the shipped model's VAE, written as the stage-2 checkpoint, comes back from train_vae unchanged
    (finished at 4,000 steps); a folder of other latent channels is one error naming the fix."""
    from dataclasses import replace
    from safetensors.torch import load_file
    from p2p.world import train
    cfg = replace(train.EMBEDDED, vae=replace(train.EMBEDDED.vae, latent_channels=8))
    vae = train.vae_from(EMBEDDED_DIR, cfg.vae)
    train.save_state(tmp_path / "vae.pt", 4000, {"vae": vae}, torch.optim.AdamW(vae.parameters()))
    back = train.train_vae(cfg, torch.zeros(1, 3, 64, 64, dtype=torch.uint8), tmp_path, steps=4000, batch=1, lr=1e-3,
                           seed=0)
    shipped = load_file(str(EMBEDDED_DIR / "model.safetensors"))
    for k, v in back.state_dict().items():
        assert torch.equal(v, shipped["vae." + k].float()), k
    with pytest.raises(ValueError, match="--latent-channels 8"):
        train.vae_from(EMBEDDED_DIR, replace(cfg.vae, latent_channels=4))
    with pytest.raises(ValueError, match="no model.toml"):
        train.vae_from(tmp_path, cfg.vae)


def test_object_weights_on_the_latent_grid_count_the_things_cells():
    from p2p.world.train import object_weights
    # a thing at (x, y) = (24, 40) px of a 64 px image, radius 6 px, grown by 2 px. The 16x16 latent's cell
    # (row i, col j) has its centre at (4j + 2, 4i + 2) px, within 8 px of the thing's centre where
    # (j - 5.5)^2 + (i - 9.5)^2 < 4: the offsets (+-0.5, +-0.5), (+-1.5, +-0.5), (+-0.5, +-1.5), 12 cells
    discs = torch.tensor([[[24.0, 40.0, 6.0], [0.0, 0.0, 0.0]]])
    w = object_weights(discs, 16, 10.0, image_size=64)
    assert w.shape == (1, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 10.0}
    rows, cols = torch.nonzero(w[0, 0] == 10.0, as_tuple=True)
    assert len(rows) == 12 and rows.min() == 8 and rows.max() == 11 and cols.min() == 4 and cols.max() == 7
    assert object_weights(discs, 64, 10.0).shape == (1, 1, 64, 64)  # the pixel grid, as the VAE uses it


@pytest.mark.parametrize("by_signal, until", [(False, 0), (True, 0), (False, 1)])
def test_object_weighted_diffusion_step_runs(tmp_path, by_signal, until):
    from p2p.world import train
    cfg = train.EMBEDDED
    captions = [scenes.caption(s) for _, _, s in scenes.sample(4, 0)]
    tok = CLIPTokenizer.from_path(EMBEDDED_DIR / "tokenizer")
    discs = torch.tensor([[[20.0, 20.0, 8.0], [0.0, 0.0, 0.0]]]).expand(4, 2, 3).clone()
    latents = torch.randn(4, cfg.unet.in_channels, 16, 16)
    train.train_diffusion(cfg, latents, tok.encode(captions), tok.encode([""])[0], tmp_path, steps=2, batch=4,
                          lr=1e-4, seed=0, min_snr_gamma=5.0, owners=grounding.token_owners(captions), discs=discs,
                          object_weight=10.0, object_weight_by_signal=by_signal, object_weight_until=until)
    assert (tmp_path / "diffusion.pt").is_file()


def test_swap_one_word_swaps_one_object_word_within_its_attribute():
    from p2p.world.train import SWAP_GROUPS
    tok = CLIPTokenizer.from_path(EMBEDDED_DIR / "tokenizer")
    class_of, members = grounding.swap_classes(tok, SWAP_GROUPS, tok.vocab_size)
    words = {int(tok.encode([w])[0][1]): w for w in scenes.vocabulary()}
    group = {w: c for c, ws in enumerate(SWAP_GROUPS) for w in ws}
    captions = ["a big red striped square and a small blue circle on a green background",
                "a small white star on a yellow background", "a big orange circle on a red background"]
    ids, owners = tok.encode(captions), grounding.token_owners(captions)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        swapped, pos = grounding.swap_one_word(ids, owners, class_of, members, torch.tensor([True, True, False]), g)
        assert pos[2] == -1 and torch.equal(swapped[2], ids[2])  # not allowed: left as it was
        for row in (0, 1):
            changed = torch.nonzero(swapped[row] != ids[row]).flatten().tolist()
            assert changed == [pos[row].item()] and owners[row, pos[row]] >= 0
            old, new = words[int(ids[row, pos[row]])], words[int(swapped[row, pos[row]])]
            assert group[old] == group[new] and old != new
            seen.add(old)
    assert seen == {"big", "red", "striped", "square", "small", "blue", "circle", "white", "star"}  # every one, never "green"


def test_context_loss_counts_the_later_words_outside_the_swapped_phrase():
    # keys: start, "red"(thing 0), "square"(thing 0), "and", "circle"(thing 1), "background"(-1); "red" is swapped
    owners = torch.tensor([[-1, 0, 0, -1, 1, -1]])
    h = torch.ones(1, 6, 4)  # |h|^2 = 4 at every key
    moved = h.clone()
    moved[0, 0] += 9.0  # before the swap: not counted (a causal encoder cannot move it anyway)
    moved[0, 2] += 5.0  # the swapped word's own phrase: free to move
    moved[0, 3, 0] += 2.0  # |dh|^2 = 4: relative move 1
    moved[0, 5, :2] += 1.0  # |dh|^2 = 2: relative move 0.5
    loss = grounding.context_loss(h, moved, owners, torch.tensor([1]))
    assert math.isclose(loss.item(), (1.0 + 0.0 + 0.5) / 3, rel_tol=1e-6)  # keys 3, 4, 5
    assert grounding.context_loss(h, moved, owners, torch.tensor([-1])).item() == 0.0  # no swap: nothing counted


def test_diffusion_step_with_the_context_loss_runs(tmp_path):
    from p2p.world import train
    cfg = train.EMBEDDED
    captions = [scenes.caption(s) for _, _, s in scenes.sample(4, 0)]
    tok = CLIPTokenizer.from_path(EMBEDDED_DIR / "tokenizer")
    discs = torch.tensor([[[20.0, 20.0, 8.0], [0.0, 0.0, 0.0]]]).expand(4, 2, 3).clone()
    train.train_diffusion(cfg, torch.randn(4, cfg.unet.in_channels, 16, 16), tok.encode(captions),
                          tok.encode([""])[0], tmp_path, steps=1, batch=4, lr=1e-4, seed=0,
                          owners=grounding.token_owners(captions), discs=discs, context_weight=1.0,
                          swap=grounding.swap_classes(tok, train.SWAP_GROUPS, tok.vocab_size))
    assert (tmp_path / "diffusion.pt").is_file()


def test_bf16_diffusion_steps_follow_the_float32_ones(tmp_path):
    """--bf16 autocasts the text encoder and the UNet: the same 50 seeded steps (grounding and context losses on)
    log a loss that is not float32's bit for bit (the autocast is on) but within 2% of it (it only rounds)."""
    from p2p.world import train
    from p2p.world.train import SWAP_GROUPS
    cfg = train.EMBEDDED
    captions = [scenes.caption(s) for _, _, s in scenes.sample(4, 0)]
    tok = CLIPTokenizer.from_path(EMBEDDED_DIR / "tokenizer")
    discs = torch.tensor([[[20.0, 20.0, 8.0], [0.0, 0.0, 0.0]]]).expand(4, 2, 3).clone()
    latents = torch.randn(4, cfg.unet.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    losses = []
    for bf16 in (False, True):
        run = tmp_path / str(bf16)
        run.mkdir()
        train.train_diffusion(cfg, latents, tok.encode(captions), tok.encode([""])[0], run, steps=50, batch=4,
                              lr=1e-4, seed=0, ground_weight=0.05, owners=grounding.token_owners(captions),
                              discs=discs, object_weight=10.0, context_weight=1.0,
                              swap=grounding.swap_classes(tok, SWAP_GROUPS, tok.vocab_size), bf16=bf16)
        losses.append(json.loads((run / "diffusion_log.jsonl").read_text().splitlines()[-1])["loss"])
    assert losses[0] != losses[1] and math.isclose(losses[0], losses[1], rel_tol=0.02), losses
