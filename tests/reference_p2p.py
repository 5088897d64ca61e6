"""Test-only reference: the authors' Prompt-to-Prompt controllers on top of diffusers attention processors.

This module re-states, independently of `p2p/` and `models/`, the semantics of the official code
(google/prompt-to-prompt: `prompt-to-prompt_stable.ipynb`, `ptp_utils.py`, `seq_aligner.py`; the null-text notebook for
the LocalBlend extras) so that parity tests can run both implementations on tiny random-weight models and compare
images. It follows THEIR code, quirks included, with these deliberate differences (all documented where they occur):

* Sampler: diffusers' `DDIMScheduler` configured like SD v1 (`SD_V1_DDIM` below, eta = 0), not the stable notebook's
  PNDM. Initial noise as the authors' `init_latent`: one `torch.randn((1, C, H//8, W//8))` from a CPU generator seeded
  with `seed`, expanded to the whole batch.
* No global state: tokenizer, prompts and step counts are arguments. No LOW_RESOURCE mode (CFG always batched as
  `[uncond x B | cond x B]`, the controller sees the conditional half only).
* `self_replace_cap` (authors: self-attention maps are injected only when their key count is `<= 16**2`) and
  `store_cap` (authors: only maps with `<= 32**2` queries are stored) are constructor parameters with the authors'
  values as defaults, because tests run at tiny latent sizes.
* `LocalBlend` works for any batch size (`mask[:1] | mask`, as the null-text / LDM notebooks) and derives its map
  resolution from the latent: `(latent_h // 4, latent_w // 4)` (the authors hard-code 16x16 for a 64x64 latent). Its
  maps are the down- and up-block cross-attention maps of the store whose query count equals that resolution -- at SD's
  native size exactly the authors' `down_cross[2:4] + up_cross[:3]`. Threshold 0.3, 3x3 max-pool (k = 1), nearest
  upsampling, divide by max: as the stable notebook. `start_blend` / `substruct_words` of the null-text notebook are
  optional (default: the stable notebook's "blend at every step, nothing subtracted").
* `authors_replacement_mapper` reproduces `seq_aligner.get_replacement_mapper_` INCLUDING its tail bug
  (`mapper[j, j] = 1` after the last swapped word), which misaligns every later token when a swapped word changes its
  token count.
* `text2image` restores the UNet's previous attention processors when it returns (the authors leave theirs installed).
* SDXL (not in the authors' code): `text2image_xl` is the same loop conditioned as diffusers' SDXL pipeline, and
  `LocalBlendXL` reads the mid block's maps too, as RoyiRa's SDXL port does.
* Robustness only (same results wherever the authors' code runs): `get_equalizer` assigns token by token (the stable
  notebook's `equalizer[:, inds] = values` crashes for a multi-token word with several values); numbers given as ints
  are accepted where the authors test `type(x) is float`; the caller's `cross_replace_steps` dict is not mutated;
  `get_word_inds` always returns int64; the null-text LocalBlend's read of the global `x_t` uses the actual latents.

Caveat for tests: with random weights the cross maps are nearly uniform, and at the tiny preset's 64x64 images the
LocalBlend maps are 2x2, where the 3x3 max-pool spreads the maximum everywhere: at threshold 0.3 the mask is all ones
(no blending). Non-trivial masks need >= 128x128 images (4x4 maps) and a high threshold (about 0.95), or synthetic maps.

Usage::

    ctrl = AttentionReplace(prompts, num_steps, cross_replace_steps=.8, self_replace_steps=.4, tokenizer=tok)
    images, _ = text2image(pipe, prompts, ctrl, num_steps=num_steps, guidance_scale=7.5, seed=0, height=64, width=64)

Use a fresh controller for every run (controllers count steps and layers, as the authors' do).
"""
from __future__ import annotations

import abc
import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

MAX_NUM_WORDS = 77

#: SD v1's scheduler betas with DDIM sampling (steps_offset=1: 50 steps are 981, 961, ..., 1).
SD_V1_DDIM = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)


# ----------------------------------------------------------------------------------------------------------------------
# Token helpers (ptp_utils.get_word_inds, get_time_words_attention_alpha; seq_aligner; get_equalizer)
# ----------------------------------------------------------------------------------------------------------------------

def get_word_inds(text: str, word_place: Union[str, int], tokenizer) -> np.ndarray:
    """Token positions (1-based: BOS is 0) of a word of `text`, as the authors' `get_word_inds`.

    `word_place` is a word (every space-separated word equal to it) or the index of a word in `text.split(" ")`.
    The authors walk the decoded tokens (`#` stripped), adding up their character counts until each word is covered;
    punctuation glued to a word therefore lands in that word, and a string not found gives an empty array.
    """
    split_text = text.split(" ")
    if isinstance(word_place, str):
        places = [i for i, word in enumerate(split_text) if word == word_place]
    elif isinstance(word_place, numbers.Integral):
        places = [int(word_place)]
    else:
        places = list(word_place)
    out = []
    if len(places) > 0:
        pieces = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0
        for i, piece in enumerate(pieces):
            cur_len += len(piece)
            if ptr in places:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out, dtype=np.int64)


def _as_bounds(bounds) -> Tuple[float, float]:
    # authors: `if type(bounds) is float: bounds = 0, bounds` (an int such as 1 would crash there; accepted here)
    if isinstance(bounds, numbers.Number):
        return 0.0, float(bounds)
    return float(bounds[0]), float(bounds[1])


def _update_alpha_time_word(alpha: torch.Tensor, bounds, prompt_ind: int, word_inds=None) -> torch.Tensor:
    start_f, end_f = _as_bounds(bounds)
    start, end = int(start_f * alpha.shape[0]), int(end_f * alpha.shape[0])
    if word_inds is None:
        word_inds = torch.arange(alpha.shape[2])
    else:
        word_inds = torch.as_tensor(word_inds, dtype=torch.long)
    alpha[:start, prompt_ind, word_inds] = 0
    alpha[start:end, prompt_ind, word_inds] = 1
    alpha[end:, prompt_ind, word_inds] = 0
    return alpha


def get_time_words_attention_alpha(prompts: Sequence[str], num_steps: int,
                                   cross_replace_steps: Union[float, Tuple[float, float], Dict[str, object]],
                                   tokenizer, max_num_words: int = MAX_NUM_WORDS) -> torch.Tensor:
    """The cross-attention injection schedule, shape `(num_steps + 1, B - 1, 1, 1, max_num_words)`.

    `cross_replace_steps` is a fraction `c` (inject at steps `[0, int(c * (num_steps + 1)))`), a `(start, end)` pair, or
    a dict `{"default_": c, word: c_word, ...}` whose words (looked up in the EDITED prompts 1..B-1) override the
    default for their token columns. A dict without "default_" gets `(0., 1.)`. Row k is used at denoising step k
    (0 = noisiest).
    """
    if not isinstance(cross_replace_steps, dict):
        cross_replace_steps = {"default_": cross_replace_steps}
    cross_replace_steps = dict(cross_replace_steps)  # the authors mutate the caller's dict; we copy it
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0.0, 1.0)
    alpha = torch.zeros(num_steps + 1, len(prompts) - 1, max_num_words)
    for i in range(len(prompts) - 1):
        alpha = _update_alpha_time_word(alpha, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [get_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha = _update_alpha_time_word(alpha, item, i, ind)
    return alpha.reshape(num_steps + 1, len(prompts) - 1, 1, 1, max_num_words)


def authors_replacement_mapper(x: str, y: str, tokenizer, max_len: int = MAX_NUM_WORDS) -> torch.Tensor:
    """The authors' word-swap mapper (`seq_aligner.get_replacement_mapper_`), (max_len, max_len), rows = source tokens,
    columns = target tokens, BUG INCLUDED.

    Both prompts must have the same number of space-separated words. Swapped words with equal token counts map token by
    token; with different counts every source token maps to every target token with weight 1/len(target tokens). Before
    and between swapped words the walk is the identity `A[i, j] = 1`; after the last swapped word the authors write
    `A[j, j] = 1` instead of `A[i, j] = 1`. When a swapped word changes its token count by d, every later target token j
    therefore takes source token j instead of j - d (e.g. "cat" -> "tyrannosaurus", 1 -> 3 tokens: target "on" (5) takes
    source "chair" (5) and source "on" (3) / "a" (4) map nowhere).
    """
    words_x, words_y = x.split(" "), y.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError(f"attention replacement edit can only be applied on prompts with the same length"
                         f" but prompt A has {len(words_x)} words and prompt B has {len(words_y)} words.")
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [get_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [get_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur = 0
    while i < max_len and j < max_len:
        if cur < len(inds_source) and inds_source[cur][0] == i:
            src, tgt = inds_source[cur], inds_target[cur]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1
            else:
                for t in tgt:
                    mapper[src, t] = 1 / len(tgt)
            cur += 1
            i += len(src)
            j += len(tgt)
        elif cur < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1  # the authors' tail: [j, j], not [i, j]
            i += 1
            j += 1
    return torch.from_numpy(mapper).float()


def get_replacement_mapper(prompts: Sequence[str], tokenizer, max_len: int = MAX_NUM_WORDS) -> torch.Tensor:
    """`authors_replacement_mapper(prompts[0], prompts[b])` for every edited prompt: (B - 1, max_len, max_len)."""
    return torch.stack([authors_replacement_mapper(prompts[0], p, tokenizer, max_len) for p in prompts[1:]])


def _global_align(x: Sequence[int], y: Sequence[int], gap: int = 0, match: int = 1, mismatch: int = -1) -> np.ndarray:
    """Needleman-Wunsch score + traceback as `seq_aligner.global_align`. Traceback codes: 1 left (gap in x, i.e. a
    token inserted in y), 2 up (token of x deleted), 3 diagonal, 4 origin. Ties resolved left, then up, then diag."""
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    score[0, 1:] = (np.arange(m) + 1) * gap
    score[1:, 0] = (np.arange(n) + 1) * gap
    trace = np.zeros((n + 1, m + 1), dtype=np.int64)
    trace[0, 1:] = 1
    trace[1:, 0] = 2
    trace[0, 0] = 4
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left = score[i, j - 1] + gap
            up = score[i - 1, j] + gap
            diag = score[i - 1, j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            best = max(left, up, diag)
            score[i, j] = best
            trace[i, j] = 1 if best == left else (2 if best == up else 3)
    return trace


def _target_to_source(x: Sequence[int], y: Sequence[int]) -> List[int]:
    """For each token of y, the aligned token index of x, or -1 (`seq_aligner.get_aligned_sequences`' mapper)."""
    trace = _global_align(x, y)
    i, j = len(x), len(y)
    pairs = []
    while i > 0 or j > 0:
        code = trace[i, j]
        if code == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif code == 1:
            j -= 1
            pairs.append((j, -1))
        elif code == 2:
            i -= 1
        else:
            break
    pairs.reverse()
    return [src for _, src in pairs]


def get_refinement_mapper(prompts: Sequence[str], tokenizer, max_len: int = MAX_NUM_WORDS
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The authors' refinement mapper (`seq_aligner.get_refinement_mapper`): (mappers, alphas), each (B - 1, max_len).

    The full token-id sequences (BOS/EOS included) are aligned with Needleman-Wunsch (gap 0, match 1, mismatch -1).
    `mappers[b, j]` is the source token index aligned to target token j (-1, i.e. the last column, for an inserted
    token)
    and `alphas[b, j]` is 1 where target token j is aligned, 0 where inserted. Beyond the target's EOS:
    `mapper[j] = j` and `alpha = 1`.
    """
    mappers, alphas = [], []
    x_seq = tokenizer.encode(prompts[0])
    for prompt in prompts[1:]:
        y_seq = tokenizer.encode(prompt)
        base = torch.tensor(_target_to_source(x_seq, y_seq), dtype=torch.int64)
        alpha = torch.ones(max_len)
        alpha[:base.shape[0]] = base.ne(-1).float()
        mapper = torch.zeros(max_len, dtype=torch.int64)
        mapper[:base.shape[0]] = base
        mapper[base.shape[0]:] = len(y_seq) + torch.arange(max_len - len(y_seq))
        mappers.append(mapper)
        alphas.append(alpha)
    return torch.stack(mappers), torch.stack(alphas)


def get_equalizer(text: str, word_select: Union[str, int, Sequence[Union[str, int]]], values: Sequence[float],
                  tokenizer, max_num_words: int = MAX_NUM_WORDS) -> torch.Tensor:
    """The stable notebook's equalizer: (len(values), 77) ones; every token of every selected word gets `values`
    (one value per row, i.e. per edited prompt; every selected word gets the same values).

    The notebook writes `equalizer[:, inds] = values`, which only broadcasts when `len(values) == 1` or a word is a
    single token; we assign token by token (the LDM notebook's loop), identical wherever the notebook runs.
    """
    if isinstance(word_select, (str, numbers.Integral)):
        word_select = (word_select,)
    equalizer = torch.ones(len(values), max_num_words)
    vals = torch.tensor(values, dtype=torch.float32)
    for word in word_select:
        for ind in get_word_inds(text, word, tokenizer):
            equalizer[:, int(ind)] = vals
    return equalizer


def get_equalizer_per_word(text: str, word_select, values: Sequence[float], tokenizer,
                           max_num_words: int = MAX_NUM_WORDS) -> torch.Tensor:
    """The null-text notebook's equalizer: (1, 77) ones, each selected word gets its own value (zip(words, values))."""
    if isinstance(word_select, (str, numbers.Integral)):
        word_select = (word_select,)
    equalizer = torch.ones(1, max_num_words)
    for word, val in zip(word_select, values):
        equalizer[:, get_word_inds(text, word, tokenizer)] = float(val)
    return equalizer


# ----------------------------------------------------------------------------------------------------------------------
# Controllers
# ----------------------------------------------------------------------------------------------------------------------

class AttentionControl(abc.ABC):
    """The authors' base controller: called once per attention layer per UNet call with the attention probabilities
    `(2 * B * heads, N, K)` of the batch `[uncond x B | cond x B]`; `forward` sees (and may edit) the conditional half.
    Counts calls; after `num_att_layers` calls one denoising step is over (`cur_step += 1; between_steps()`)."""

    def __init__(self):
        self.cur_step = 0
        self.num_att_layers = -1  # set by register_attention_control
        self.cur_att_layer = 0

    def step_callback(self, x_t: torch.Tensor) -> torch.Tensor:
        return x_t

    def between_steps(self):
        return

    @property
    def num_uncond_att_layers(self) -> int:
        return 0  # no LOW_RESOURCE mode

    @abc.abstractmethod
    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        if self.cur_att_layer >= self.num_uncond_att_layers:
            h = attn.shape[0]
            attn[h // 2:] = self.forward(attn[h // 2:], is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers + self.num_uncond_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def reset(self):
        self.cur_step = 0
        self.cur_att_layer = 0


class EmptyControl(AttentionControl):
    """No edit (the notebooks' "without P2P" baseline)."""

    def forward(self, attn, is_cross, place_in_unet):
        return attn


class AttentionStore(AttentionControl):
    """Stores the conditional-half maps of every layer with `<= store_cap` queries (authors: 32**2), as a running SUM
    over steps in `attention_store` ({"down_cross", "mid_cross", "up_cross", "down_self", "mid_self", "up_self"} ->
    list in call order of `(B * heads, N, K)` tensors). `get_average_attention()` divides by the number of steps.

    As in the authors' code the stored tensor is the very tensor the editing controllers then modify in place, so the
    store (and LocalBlend) sees the EDITED maps of the edited prompts.
    """

    def __init__(self, store_cap: int = 32 ** 2):
        super().__init__()
        self.store_cap = store_cap
        self.step_store = self.get_empty_store()
        self.attention_store = {}

    @staticmethod
    def get_empty_store():
        return {"down_cross": [], "mid_cross": [], "up_cross": [], "down_self": [], "mid_self": [], "up_self": []}

    def forward(self, attn, is_cross, place_in_unet):
        key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= self.store_cap:
            self.step_store[key].append(attn)
        return attn

    def between_steps(self):
        if len(self.attention_store) == 0:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.get_empty_store()

    def get_average_attention(self):
        return {key: [item / self.cur_step for item in items] for key, items in self.attention_store.items()}

    def reset(self):
        super().reset()
        self.step_store = self.get_empty_store()
        self.attention_store = {}


def _word_layers(prompts, words, tokenizer, max_num_words):
    layers = torch.zeros(len(prompts), 1, 1, 1, 1, max_num_words)
    for i, (prompt, words_) in enumerate(zip(prompts, words)):
        if isinstance(words_, str):
            words_ = [words_]
        for word in words_:
            layers[i, :, :, :, :, get_word_inds(prompt, word, tokenizer)] = 1
    return layers


class LocalBlend:
    """The authors' LocalBlend, called on the latents after every scheduler step with the running-sum store.

    `words[b]` (a word or a tuple of words) selects tokens of `prompts[b]`. Mask: the down/up cross maps at
    `(latent_h // 4, latent_w // 4)` (at SD's native size: the authors' five 16x16 layers), times the selected tokens,
    summed over tokens, mean over layers * heads, 3x3 max-pool, nearest upsampling to the latent size, divided by its
    max, `> threshold`; OR-ed with the source prompt's mask. Then `x_t = x_t[:1] + mask * (x_t - x_t[:1])`: outside the
    mask every edited latent becomes the source latent.

    Optional null-text extras: blend only from call `int(start_blend * num_steps) + 1` on, and
    `substruct_words` (mask without pooling, `> substruct_threshold`, OR-ed with the source's) removed from the mask.
    Defaults reproduce the stable notebook. `masks` records the (B, 1, h, w) float mask of every blending call.
    """

    def __init__(self, prompts: Sequence[str], words, tokenizer, *, threshold: float = 0.3,
                 substruct_words=None, substruct_threshold: float = 0.3, start_blend: float = 0.0,
                 num_steps: Optional[int] = None, max_num_words: int = MAX_NUM_WORDS):
        self.max_num_words = max_num_words
        self.alpha_layers = _word_layers(prompts, words, tokenizer, max_num_words)
        self.substruct_layers = (None if substruct_words is None
                                 else _word_layers(prompts, substruct_words, tokenizer, max_num_words))
        self.threshold = threshold
        self.substruct_threshold = substruct_threshold
        if start_blend and num_steps is None:
            raise ValueError("start_blend needs num_steps")
        self.start_blend = int(start_blend * num_steps) if start_blend else 0
        self.counter = 0
        self.masks: List[torch.Tensor] = []

    @staticmethod
    def map_resolution(latent_hw) -> Tuple[int, int]:
        return latent_hw[0] // 4, latent_hw[1] // 4

    @classmethod
    def select_maps(cls, attention_store, latent_hw) -> List[torch.Tensor]:
        """The down then up cross maps with (latent_h/4)*(latent_w/4) queries (authors: down_cross[2:4] + up_cross[:3]
        at a 64x64 latent with the 32**2 store cap)."""
        rh, rw = cls.map_resolution(latent_hw)
        return [m for key in ("down_cross", "up_cross") for m in attention_store[key] if m.shape[1] == rh * rw]

    def _get_mask(self, maps, alpha, use_pool, latent_hw, threshold):
        k = 1
        maps = (maps * alpha.to(maps.device)).sum(-1).mean(1)
        if use_pool:
            maps = F.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
        mask = F.interpolate(maps, size=tuple(latent_hw))  # nearest
        mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
        mask = mask.gt(threshold)
        return mask[:1] | mask  # source-word mask OR each prompt's own

    def __call__(self, x_t: torch.Tensor, attention_store) -> torch.Tensor:
        self.counter += 1
        if self.counter <= self.start_blend:
            return x_t
        latent_hw = tuple(x_t.shape[2:])
        rh, rw = self.map_resolution(latent_hw)
        maps = self.select_maps(attention_store, latent_hw)
        if not maps:
            raise RuntimeError(f"LocalBlend: no stored cross maps with {rh}x{rw} queries (check store_cap)")
        b = self.alpha_layers.shape[0]
        maps = torch.cat([item.reshape(b, -1, 1, rh, rw, self.max_num_words) for item in maps], dim=1)
        mask = self._get_mask(maps, self.alpha_layers, True, latent_hw, self.threshold)
        if self.substruct_layers is not None:
            mask = mask & ~self._get_mask(maps, self.substruct_layers, False, latent_hw, self.substruct_threshold)
        mask = mask.to(x_t.dtype)
        self.masks.append(mask)
        return x_t[:1] + mask * (x_t - x_t[:1])


class LocalBlendXL(LocalBlend):
    """The authors' LocalBlend reading the cross maps of down, mid and up at the latent/4 level: on SDXL the mid block
    is at that level too (32x32 at 1024 px), and RoyiRa's SDXL port (sd2-sdxl.md §6.1) reads it with the others."""

    @classmethod
    def select_maps(cls, attention_store, latent_hw):
        rh, rw = cls.map_resolution(latent_hw)
        return [m for key in ("down_cross", "mid_cross", "up_cross") for m in attention_store[key]
                if m.shape[1] == rh * rw]


class AttentionControlEdit(AttentionStore, abc.ABC):
    """The authors' editing engine. Prompt 0 is the source, prompts 1..B-1 the edits.

    Cross layers (all of them, no resolution cap), every step k:
        M*_b <- alpha[k, b, j] * Edit(M_0, M*_b)[..., j] + (1 - alpha[k, b, j]) * M*_b[..., j]
    Self layers with `<= self_replace_cap` keys (authors: 16**2), at steps
    `int(s0 * num_steps) <= k < int(s1 * num_steps)`:
        M*_b <- M_0
    `self_replace_steps` is `s1` or `(s0, s1)`; `cross_replace_steps` see `get_time_words_attention_alpha`.
    """

    def __init__(self, prompts: Sequence[str], num_steps: int, cross_replace_steps, self_replace_steps,
                 local_blend: Optional[LocalBlend] = None, *, tokenizer, self_replace_cap: int = 16 ** 2,
                 store_cap: int = 32 ** 2):
        super().__init__(store_cap=store_cap)
        self.batch_size = len(prompts)
        self.cross_replace_alpha = get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps, tokenizer)
        s0, s1 = _as_bounds(self_replace_steps)
        self.num_self_replace = int(num_steps * s0), int(num_steps * s1)
        self.self_replace_cap = self_replace_cap
        self.local_blend = local_blend

    def step_callback(self, x_t):
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t

    def replace_self_attention(self, attn_base, att_replace):
        if att_replace.shape[2] <= self.self_replace_cap:
            return attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
        return att_replace

    @abc.abstractmethod
    def replace_cross_attention(self, attn_base, att_replace):
        raise NotImplementedError

    def forward(self, attn, is_cross, place_in_unet):
        super().forward(attn, is_cross, place_in_unet)  # store first: the in-place edit below lands in the store too
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            h = attn.shape[0] // self.batch_size
            attn = attn.reshape(self.batch_size, h, *attn.shape[1:])  # a view: edits write through
            attn_base, attn_replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step].to(attn.device, attn.dtype)
                attn[1:] = (self.replace_cross_attention(attn_base, attn_replace) * alpha_words
                            + (1 - alpha_words) * attn_replace)
            else:
                attn[1:] = self.replace_self_attention(attn_base, attn_replace)
            attn = attn.reshape(self.batch_size * h, *attn.shape[2:])
        return attn


class AttentionReplace(AttentionControlEdit):
    """Word swap: `Edit_b = einsum('hpw,bwn->bhpn', M_0, A)` with the authors' replacement mapper (bug included)."""

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend=None, *, tokenizer,
                 self_replace_cap: int = 16 ** 2, store_cap: int = 32 ** 2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer=tokenizer,
                         self_replace_cap=self_replace_cap, store_cap=store_cap)
        self.mapper = get_replacement_mapper(prompts, tokenizer)

    def replace_cross_attention(self, attn_base, att_replace):
        return torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper.to(attn_base.device, attn_base.dtype))


class AttentionRefine(AttentionControlEdit):
    """Adding words: aligned target tokens take the source map of their aligned source token, new tokens keep their
    own maps (`M_0[..., mapper] * alphas + M*_b * (1 - alphas)`, no renormalisation)."""

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend=None, *, tokenizer,
                 self_replace_cap: int = 16 ** 2, store_cap: int = 32 ** 2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer=tokenizer,
                         self_replace_cap=self_replace_cap, store_cap=store_cap)
        self.mapper, alphas = get_refinement_mapper(prompts, tokenizer)
        self.alphas = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])

    def replace_cross_attention(self, attn_base, att_replace):
        base_replace = attn_base[:, :, self.mapper.to(attn_base.device)].permute(2, 0, 1, 3)
        alphas = self.alphas.to(attn_base.device, attn_base.dtype)
        return base_replace * alphas + att_replace * (1 - alphas)


class AttentionReweight(AttentionControlEdit):
    """Reweighting: `Edit = c * M_0` (post-softmax, not renormalised; `equalizer` (E, 77) with E = 1 or B - 1), applied
    on top of `controller.replace_cross_attention` when chained on a Replace/Refine controller."""

    def __init__(self, prompts, num_steps, cross_replace_steps, self_replace_steps, equalizer, local_blend=None,
                 controller: Optional[AttentionControlEdit] = None, *, tokenizer, self_replace_cap: int = 16 ** 2,
                 store_cap: int = 32 ** 2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer=tokenizer,
                         self_replace_cap=self_replace_cap, store_cap=store_cap)
        self.equalizer = equalizer
        self.prev_controller = controller

    def replace_cross_attention(self, attn_base, att_replace):
        if self.prev_controller is not None:
            attn_base = self.prev_controller.replace_cross_attention(attn_base, att_replace)
        eq = self.equalizer.to(attn_base.device, attn_base.dtype)
        return attn_base[None, :, :, :] * eq[:, None, None, :]


# ----------------------------------------------------------------------------------------------------------------------
# Hook and generation loop
# ----------------------------------------------------------------------------------------------------------------------

class _DummyController:
    """`register_attention_control(unet, None)`: plain attention through the explicit path."""

    def __init__(self):
        self.num_att_layers = 0

    def __call__(self, attn, is_cross, place_in_unet):
        return attn

    def step_callback(self, x_t):
        return x_t


class P2PAttnProcessor:
    """diffusers attention processor computing the attention probabilities explicitly (like `AttnProcessor`) and
    handing them to the controller as the authors' patched `forward` did."""

    def __init__(self, controller, place_in_unet: str):
        self.controller = controller
        self.place_in_unet = place_in_unet

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        is_cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)

        attention_probs = attn.get_attention_scores(query, key, attention_mask)  # (2B * heads, N, K)
        attention_probs = self.controller(attention_probs, is_cross, self.place_in_unet)

        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _place(name: str) -> Optional[str]:
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    if name.startswith("up_blocks"):
        return "up"
    return None


def register_attention_control(unet, controller) -> dict:
    """Install a `P2PAttnProcessor` on every attention layer of `down_blocks`, `mid_block`, `up_blocks` (self and cross)
    and set `controller.num_att_layers`. Returns the previous processors (pass to `unet.set_attn_processor` to undo)."""
    if controller is None:
        controller = _DummyController()
    previous = dict(unet.attn_processors)
    procs, count = {}, 0
    for name, proc in previous.items():
        place = _place(name)
        if place is None:
            procs[name] = proc
        else:
            procs[name] = P2PAttnProcessor(controller, place)
            count += 1
    unet.set_attn_processor(procs)
    controller.num_att_layers = count
    return previous


def init_latent(latent, unet, height, width, seed, batch_size, vae_scale_factor=8):
    """The authors' `init_latent`: one (1, C, H/8, W/8) CPU-generator draw, expanded to the batch."""
    if latent is None:
        latent = torch.randn((1, unet.config.in_channels, height // vae_scale_factor, width // vae_scale_factor),
                             generator=torch.Generator("cpu").manual_seed(seed))
    latents = latent.expand(batch_size, *latent.shape[1:]).to(unet.device, unet.dtype)
    return latent, latents


def diffusion_step(unet, scheduler, controller, latents, context, t, guidance_scale):
    """One CFG step with the batch `[uncond x B | cond x B]`, then the controller's step_callback (LocalBlend)."""
    noise_pred = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context)["sample"]
    noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
    latents = scheduler.step(noise_pred, t, latents, eta=0.0)["prev_sample"]
    return controller.step_callback(latents)


def latent2image(vae, latents) -> np.ndarray:
    """The authors' `latent2image`: decode `latents / scaling_factor` (0.18215), to [0, 1], then uint8 by truncation."""
    image = vae.decode(1 / vae.config.scaling_factor * latents)["sample"]
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.cpu().permute(0, 2, 3, 1).float().numpy()
    return (image * 255).astype(np.uint8)


@torch.no_grad()
def text2image(pipe, prompts: Sequence[str], controller, *, num_steps: int, guidance_scale: float, seed: int,
               height: int, width: int, latent: Optional[torch.Tensor] = None, scheduler=None,
               return_latents: bool = False):
    """The authors' `text2image_ldm_stable` on a diffusers `StableDiffusionPipeline`, sampled with DDIM.

    Returns `(images, latents)`: uint8 images (B, height, width, 3) and, if `return_latents`, the list
    `[x_T, x after step 1, ..., x_0]` (num_steps + 1 tensors (B, C, h, w), after LocalBlend), else None.
    `controller` may be None (plain attention through the explicit path). `latent` (1, C, h, w) overrides the seed.
    """
    unet, vae, tokenizer, text_encoder = pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder
    if controller is None:
        controller = _DummyController()
    previous = register_attention_control(unet, controller)
    try:
        batch_size = len(prompts)
        text_input = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                               truncation=True, return_tensors="pt")
        text_embeddings = text_encoder(text_input.input_ids.to(unet.device))[0]
        max_length = text_input.input_ids.shape[-1]
        uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
        uncond_embeddings = text_encoder(uncond_input.input_ids.to(unet.device))[0]
        context = torch.cat([uncond_embeddings, text_embeddings]).to(unet.dtype)
        latent, latents = init_latent(latent, unet, height, width, seed, batch_size,
                                      getattr(pipe, "vae_scale_factor", 8))
        scheduler = scheduler if scheduler is not None else DDIMScheduler(**SD_V1_DDIM)
        scheduler.set_timesteps(num_steps)
        trajectory = [latents]
        for t in scheduler.timesteps:
            latents = diffusion_step(unet, scheduler, controller, latents, context, t, guidance_scale)
            trajectory.append(latents)
        images = latent2image(vae, latents)
    finally:
        unet.set_attn_processor(dict(previous))  # (set_attn_processor empties the dict it is given)
    return images, (trajectory if return_latents else None)


@torch.no_grad()
def text2image_xl(pipe, prompts: Sequence[str], controller, *, num_steps: int, guidance_scale: float, seed: int,
                  height: int, width: int, scheduler=None, return_latents: bool = False):
    """`text2image` on a diffusers `StableDiffusionXLPipeline`: conditioning by diffusers' `encode_prompt` (both towers,
    the pooled vector, zeros for the empty negative prompt), the UNet given the pooled vectors and the time ids of the
    image size (crop (0, 0)), DDIM as SD samples. Same arguments and returns as `text2image`."""
    unet = pipe.unet
    previous = register_attention_control(unet, controller)
    try:
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(list(prompts), device=unet.device,
                                                                 num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True)
        context = torch.cat([uncond, cond]).to(unet.dtype)
        added = {"text_embeds": torch.cat([uncond_pooled, pooled]).to(unet.dtype),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width]], dtype=unet.dtype,
                                          device=unet.device).repeat(2 * len(prompts), 1)}
        _, latents = init_latent(None, unet, height, width, seed, len(prompts), pipe.vae_scale_factor)
        scheduler = scheduler if scheduler is not None else DDIMScheduler(**SD_V1_DDIM)
        scheduler.set_timesteps(num_steps)
        trajectory = [latents]
        for t in scheduler.timesteps:
            eps_u, eps_c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=context,
                                added_cond_kwargs=added).sample.chunk(2)
            latents = scheduler.step(eps_u + guidance_scale * (eps_c - eps_u), t, latents, eta=0.0).prev_sample
            latents = controller.step_callback(latents)
            trajectory.append(latents)
        images = latent2image(pipe.vae, latents)
    finally:
        unet.set_attn_processor(dict(previous))
    return images, (trajectory if return_latents else None)


def aggregate_attention(store: AttentionStore, prompts_count: int, res: Union[int, Tuple[int, int]],
                        from_where: Sequence[str], is_cross: bool, select: int) -> torch.Tensor:
    """The authors' `aggregate_attention`: average (over steps, then layers * heads) of the stored maps of prompt
    `select` with `res * res` queries from the places `from_where` ("down"/"mid"/"up"): (res_h, res_w, K) on the CPU."""
    rh, rw = (res, res) if isinstance(res, numbers.Integral) else res
    out = []
    maps = store.get_average_attention()
    for location in from_where:
        for item in maps[f"{location}_{'cross' if is_cross else 'self'}"]:
            if item.shape[1] == rh * rw:
                out.append(item.reshape(prompts_count, -1, rh, rw, item.shape[-1])[select])
    out = torch.cat(out, dim=0)
    return (out.sum(0) / out.shape[0]).cpu()
