"""SDXL's text conditioning (Podell et al. 2023; sd2-sdxl.md §3.3-3.5): two tokenizers, two text towers.

    psi(P) = [ h_L(P) || h_G(P) ]           (B, 77, 768 + 1280): the penultimate states of CLIP ViT-L/14 and of
                                             OpenCLIP ViT-bigG/14, no final LayerNorm, CLIP-L first
    y(P)   = W_G LN(h_G^last(P))[eos]        (B, 1280): bigG's pooled vector, through its text_projection

The UNet cross-attends to psi(P) and adds y(P), with the size/crop numbers, to its timestep embedding
(models/unet.py, `added`). So that the rest of the code (guidance, null-text inversion, edits) keeps handling one
tensor per prompt, `SDXLTextEncoder` returns psi(P) with one more row, the "vector" row: y(P) followed by zeros
(B, 78, 2048). `split_conditioning` takes it apart for the UNet; the attention sites only ever see the 77 tokens.

The two tokenizers share CLIP's BPE; they differ in padding (CLIP-L: <|endoftext|>, bigG: "!" = id 0) and, in
diffusers' tokenizer_2, in a typed "!": it is the padding token there, so each "!" is its own id 0, where CLIP-L
reads "!!" as one token. Such a prompt puts words at other positions in the two streams: word positions (what
every Prompt-to-Prompt edit reads) are then refused with the reason.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
from tokenizers import AddedToken
from torch import nn

from .clip import CLIPTextConfig, CLIPTextModel
from .errors import UserError
from .tokenizer import MAX_LENGTH, CLIPTokenizer, PromptTokenizer


@dataclass(frozen=True)
class SDXLTextConfig:
    """The two towers: CLIP ViT-L/14 (`text_encoder`) and OpenCLIP ViT-bigG/14 with its projection
    (`text_encoder_2`), both read at the penultimate layer."""

    clip: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(layer="penultimate"))
    open_clip: CLIPTextConfig = field(default_factory=lambda: CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
        layer="penultimate", projection_dim=1280))

    def __post_init__(self):
        towers = (self.clip, self.open_clip)
        if any(t.layer != "penultimate" for t in towers) or not self.open_clip.projection_dim:
            raise UserError("SDXL reads both text towers at the penultimate layer, the second with a projection")
        if self.open_clip.projection_dim > self.width:
            raise UserError("SDXL's pooled vector must fit in a row of the text states")

    @property
    def width(self) -> int:
        return self.clip.hidden_size + self.open_clip.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.open_clip.projection_dim

    @property
    def vocab_size(self) -> int:
        return min(self.clip.vocab_size, self.open_clip.vocab_size)


class SDXLTextEncoder(nn.Module):
    """ids (B, 2, 77) (CLIP-L's row, bigG's row) -> (B, 78, 2048): psi(P), then the vector row [y(P), 0]."""

    def __init__(self, cfg: SDXLTextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_encoder = CLIPTextModel(cfg.clip)
        self.text_encoder_2 = CLIPTextModel(cfg.open_clip)

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 3 or ids.shape[1] != 2:
            raise ValueError(f"SDXL's text encoder takes (B, 2, 77) ids (a row per tokenizer), got {tuple(ids.shape)}")
        h_l, _ = self.text_encoder.states_and_pooled(ids[:, 0])
        h_g, pooled = self.text_encoder_2.states_and_pooled(ids[:, 1])
        states = torch.cat([h_l, h_g], dim=-1)
        vector = torch.cat([pooled, pooled.new_zeros(pooled.shape[0], self.width - pooled.shape[1])], dim=-1)
        return torch.cat([states, vector[:, None]], dim=1)


def split_conditioning(context: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 78, W) -> (psi (B, 77, W), pooled y (B, pooled_dim)); views, nothing copied or changed."""
    if context.shape[1] != MAX_LENGTH + 1:
        raise ValueError(f"SDXL conditioning has {MAX_LENGTH} token rows and a vector row, got {context.shape[1]} rows")
    return context[:, :MAX_LENGTH], context[:, MAX_LENGTH, :pooled_dim]


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2): the size the training image had before it was resized
    (`original_size`), the top-left corner of the crop taken from it (`crops_coords_top_left`), and the size asked
    for (`target_size`), each (height, width) or (top, left) in pixels: diffusers' StableDiffusionXLPipeline
    arguments of these names. None is the image's own size, crop (0, 0): what diffusers and sgm's demo pass by
    default. Both guidance branches get the same numbers, as diffusers does when its negative_* sizes are unset.
    The paper's uses: an original size below the target gives the blur of upscaled training images, a crop away
    from (0, 0) an object cut at the border."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None

    def __post_init__(self):
        for name, low in (("original_size", 1), ("crops_coords_top_left", 0), ("target_size", 1)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, (str, bytes)) or len(v) != 2 or not all(isinstance(x, int) and x >= low for x in v):
                raise UserError(f"SDXL's {name} takes two whole numbers of pixels "
                                f"{'>= 0 (top, left)' if low == 0 else '> 0 (height, width)'}, got {v!r}")
            object.__setattr__(self, name, tuple(v))

    @property
    def is_default(self) -> bool:
        return self == SizeConditioning()

    def time_ids(self, height: int, width: int, batch: int) -> torch.Tensor:
        """(B, 6): original size (h, w), crop top-left, target size (h, w) for an image of height x width."""
        return time_ids(height, width, batch, self.crops_coords_top_left, self.original_size, self.target_size)

    def to_dict(self) -> dict:
        """The values set, as lists (for the metadata written with an image)."""
        return {k: list(v) for k, v in self.__dict__.items() if v is not None and v != SizeConditioning().__dict__[k]}


def time_ids(height: int, width: int, batch: int, crop: tuple[int, int] = (0, 0),
             original: tuple[int, int] | None = None, target: tuple[int, int] | None = None) -> torch.Tensor:
    """SDXL's micro-conditioning (B, 6): original size (h, w), crop top-left, target size (h, w); the sizes
    default to the image's own (diffusers' `_get_add_time_ids` with original_size = target_size = (height, width))."""
    return torch.tensor([[*(original or (height, width)), *crop, *(target or (height, width))]],
                        dtype=torch.float32).expand(batch, 6)


class _PaddedWithBang(CLIPTokenizer):
    """diffusers' SDXL tokenizer_2: CLIP's BPE, padded with "!" (id 0), and "!" a special token, so a typed "!"
    is id 0 too and "!!" two of them (transformers matches special tokens before the BPE)."""

    pad_token = "!"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tok.add_special_tokens([AddedToken("!", special=True)])


class SDXLTokenizer(PromptTokenizer):
    """Both of SDXL's tokenizers. Word positions, tokens and `encode` are CLIP-L's (tokenizer 1); `encode_pair`
    gives the text encoder both id rows. Word positions are refused for a prompt the two split differently."""

    def __init__(self, first: CLIPTokenizer, second: _PaddedWithBang):
        self.first, self.second = first, second
        self._tok, self.source, self.vocab_size = first._tok, first.source, first.vocab_size
        self.bos_id, self.eos_id, self.pad_id = first.bos_id, first.eos_id, first.pad_id

    @classmethod
    def from_path(cls, path) -> SDXLTokenizer:
        """Any CLIP tokenizer CLIPTokenizer.from_path reads (the two SDXL tokenizers share vocabulary and merges)."""
        first = CLIPTokenizer.from_path(path)
        vocab = first._tok.get_vocab(with_added_tokens=False)
        merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in _merges(first)]
        return cls(first, _PaddedWithBang(vocab, merges, source=first.source))

    def tokens(self, prompt: str) -> list[str]:
        self.check_agrees(prompt)
        return self.first.tokens(prompt)

    def encode(self, prompts: str | list[str]) -> torch.LongTensor:
        """CLIP-L's (B, 77) ids, what the edit engine aligns and locates words in: refused for a prompt the two
        tokenizers split differently (`encode_pair` is what sampling uses, and takes any prompt)."""
        for p in [prompts] if isinstance(prompts, str) else prompts:
            self.check_agrees(p)
        return self.first.encode(prompts)

    def decode(self, ids):
        return self.first.decode(ids)

    def encode_pair(self, prompts: str | list[str]) -> torch.LongTensor:
        """(B, 2, 77): CLIP-L's ids (padded with <|endoftext|>), bigG's ids (padded with "!" = 0)."""
        return torch.stack([self.first.encode(prompts), self.second.encode(prompts)], dim=1)  # no check: sampling

    def check_agrees(self, prompt: str):
        """Raise a UserError if the two tokenizers put the prompt's tokens at different positions."""
        a, b = (t._encode([prompt])[0] for t in (self.first, self.second))
        if a.offsets != b.offsets:
            short = prompt if len(prompt) <= 40 else prompt[:37] + "..."
            raise UserError(f"SDXL's two tokenizers split the prompt {short!r} differently ({len(a.ids)} and "
                            f"{len(b.ids)} tokens: the second reads each '!' as its padding token), so its words "
                            "sit at different positions in the two text encoders; remove the '!' characters")

    def _words(self, prompt, enc=None):
        self.check_agrees(prompt)
        return super()._words(prompt, enc)


def _merges(tok: CLIPTokenizer) -> list:
    """The BPE merges of a loaded tokenizer, read back from `tokenizers`' JSON form."""
    return json.loads(tok._tok.to_str())["model"]["merges"]
