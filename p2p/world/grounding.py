"""Grounding the embedded model's cross-attention maps while it trains (optional: `--ground-weight`), and keeping
its text states to their phrases (`--context-weight`, at the end of this file).

Prompt-to-Prompt rests on one property of a text-to-image model: the cross-attention map M of a word falls on
the pixels that word describes (Sec. 3.1 of the paper). Stable Diffusion learns this from billions of captioned
images. The embedded model, trained from scratch on 20,000 scenes, learns to draw the right colours without it:
measured on two-object scenes, a colour word's map (normalised by its maximum, averaged over steps and the
16x16 layers as local blend does) is 0.80 on its own object, 0.72 on the other one and 0.25 on the background.
Local blend then masks both objects, and the untouched one drifts with the edit.

The scenes come with their layout, so the maps can be taught where to look, as TokenCompose (Wang et al. 2024)
does with segmentation masks: for each word of an object's phrase ("big", "red", "striped", "square"), the loss
is (1 - the share of the word's attention mass that lies on the object)^2, the mass summed over the queries of a
map averaged over heads. An object is its bounding disc (the renderer's centre and radius, grown by half a cell
of the map's grid). Maps are taken at the cross-attention layers of `RES`; timesteps with almost no signal
(alpha_bar_t < MIN_ALPHA_BAR) are left out, since there the place of an object is not yet decided.
"""
from __future__ import annotations

import torch

RES = (16, 8)  # the grids whose cross-attention maps are grounded (the embedded model's blend and edit levels)
MIN_ALPHA_BAR = 0.05  # SNR about 0.05: the t of larger noise are not grounded


class MapRecorder:
    """A training-time attention controller: keeps the cross-attention maps M (with their graph) of the
    layers at `res`, and returns them unchanged."""

    def __init__(self, res=RES):
        self.res, self.maps = tuple(res), []

    def wants_map(self, site, hw) -> bool:
        return site.is_cross and max(hw) in self.res

    def on_map(self, M, site, hw):
        self.maps.append((M, hw))
        return M


def token_owners(captions: list[str], length: int = 77) -> torch.Tensor:
    """(n, length) long: for each token position of a caption (position 0 is the start token, then one token
    per word), the index of the thing whose phrase the word describes, or -1 (articles, "and", "on", the
    background's words, the end and padding)."""
    owners = torch.full((len(captions), length), -1, dtype=torch.long)
    for row, caption in enumerate(captions):
        thing = 0
        for pos, word in enumerate(caption.split(), start=1):
            if word == "and":
                thing += 1
            elif word == "on":
                break
            elif word != "a" and pos < length:
                owners[row, pos] = thing
    return owners


def disc_masks(discs: torch.Tensor, hw: tuple[int, int], image_size: int, margin: float | None = None) -> torch.Tensor:
    """discs (B, things, 3): centre x, centre y, radius in pixels (radius 0: no such thing) -> (B, things, h*w)
    float: 1 on the cells of an h x w grid over the image whose centre lies within the disc grown by `margin`
    pixels (default: half a cell)."""
    h, w = hw
    cell = image_size / h
    margin = cell / 2 if margin is None else margin
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * cell
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * cell
    dy = ys.view(1, 1, h, 1) - discs[..., 1, None, None]
    dx = xs.view(1, 1, 1, w) - discs[..., 0, None, None]
    inside = (dx ** 2 + dy ** 2).sqrt() < discs[..., 2, None, None] + margin
    inside &= (discs[..., 2] > 0)[..., None, None]
    return inside.flatten(2).float()


def grounding_loss(maps: list, owners: torch.Tensor, discs: torch.Tensor, keep: torch.Tensor,
                   image_size: int) -> torch.Tensor:
    """The mean over maps and over the grounded words of (1 - share of the word's mass on its object)^2.
    maps: [(M (B, heads, h*w, keys), (h, w))]; owners (B, keys) from `token_owners`; keep (B,) bool: the samples
    to ground (captioned, and with enough signal)."""
    valid = (owners >= 0) & keep[:, None]
    if not maps or not valid.any():
        return torch.zeros(())
    total = 0.0
    for M, hw in maps:
        A = M.float().mean(1)  # (B, queries, keys)
        inside = disc_masks(discs, hw, image_size)  # (B, things, queries)
        mass_in = torch.einsum("bqk,bjq->bjk", A, inside)  # (B, things, keys)
        share = mass_in.gather(1, owners.clamp(min=0)[:, None, :])[:, 0] / A.sum(1).clamp_min(1e-8)
        total = total + ((1 - share) ** 2 * valid).sum() / valid.sum()
    return total / len(maps)


# --- the text states' context (optional: `--context-weight`) ------------------------------------------------
#
# Prompt-to-Prompt fixes the maps M of a swapped prompt, not the values the other words bring. A causal text
# encoder may carry the swapped word into every later state ("a red square on a green background": the states of
# "green", "background" and the padding then hold "red" too), and an edit of one object then repaints the rest.
# Nothing in a scene's caption needs that mixing: each phrase describes its own thing. The context loss swaps one
# attribute word of one object for another value of the same attribute and asks the states of every later word
# outside that object's phrase (the other object, the background, the end and padding) to stay where they were.
# Measured (p2p/world/train_notes.md): it keeps those states (0.001 of their norm moved, against 0.17 on the shipped
# model), but on the sd-v1 object-weight recipe the edits repaint the image just as much; the cause lay elsewhere.

def swap_classes(tokenizer, groups: list[list[str]], vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """class_of (vocab_size,) long: each word's attribute group, -1 for the rest; members (groups, most) long:
    each group's token ids, padded with -1. Every word is one token (the caption grammar is built so)."""
    class_of = torch.full((vocab_size,), -1, dtype=torch.long)
    members = torch.full((len(groups), max(len(g) for g in groups)), -1, dtype=torch.long)
    for c, words in enumerate(groups):
        ids = tokenizer.encode(list(words))[:, 1]  # position 0 is the start token
        class_of[ids] = c
        members[c, :len(words)] = ids
    return class_of, members


def swap_one_word(tokens: torch.Tensor, owners: torch.Tensor, class_of: torch.Tensor, members: torch.Tensor,
                  allowed: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row where `allowed`, one object word of an attribute group replaced by another of its group.
    Returns the swapped tokens (a new tensor) and the swapped position, -1 where nothing was swapped."""
    cls = class_of[tokens]
    candidates = (owners >= 0) & (cls >= 0) & allowed[:, None]
    scores = torch.rand(tokens.shape, generator=g).masked_fill(~candidates, -1.0)
    pos = scores.argmax(1)
    has = candidates.any(1)
    rows = torch.arange(len(tokens))
    c = cls[rows, pos].clamp(min=0)
    size = (members[c] >= 0).sum(1)
    here = (members[c] == tokens[rows, pos, None]).long().argmax(1)
    shift = (torch.rand(len(tokens), generator=g) * (size - 1)).long() + 1  # 1 .. size-1: never the same word
    new = members[c, (here + shift) % size]
    swapped = tokens.clone()
    swapped[rows[has], pos[has]] = new[has]
    return swapped, torch.where(has, pos, torch.full_like(pos, -1))


def context_loss(h: torch.Tensor, h_swapped: torch.Tensor, owners: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean of |h' - h|^2 / |h|^2 over the positions after the swapped one that lie outside its object's phrase.
    h, h_swapped (B, keys, dim): the states of a caption and of its swap; pos (B,) from `swap_one_word`."""
    keys = torch.arange(h.shape[1])
    owner = owners.gather(1, pos.clamp(min=0)[:, None])
    outside = (keys[None] > pos[:, None]) & (owners != owner) & (pos[:, None] >= 0)
    if not outside.any():
        return torch.zeros(())
    move = ((h_swapped - h) ** 2).sum(-1) / (h.detach() ** 2).sum(-1).clamp_min(1e-8)
    return (move * outside).sum() / outside.sum()
