"""Choosing attention sites: one selection type for the edit, the local blend and the attention store,
and the table of the authors' resolution-dependent Prompt-to-Prompt defaults.

Every attention layer of the UNet is a `Site` (models/attention.py): its place (down/mid/up), its kind
(self/cross), its native resolution `res` (the side of its attention grid at the model's default size:
SD v1 64/32/16/8) and its transformer `block`. A `SiteSelection` picks sites by any of these, and by
`max_res`, the authors' cap on the grid of a call: "layers with at most 16 x 16 keys" for self-attention
injection (Sec. 3.2), "at most 32 x 32 queries" for the maps they store. `max_res` is checked against the
grid of the call, so at another image size it keeps the authors' meaning (a number of keys).
"""
from __future__ import annotations

from dataclasses import dataclass

from models.attention import Site
from models.errors import UserError
from models.presets import ModelConfig

PLACES = ("down", "mid", "up")
KINDS = ("cross", "self")


@dataclass(frozen=True)
class SiteSelection:
    """A set of attention sites. None means "any" for `res`, `blocks` and `max_res`."""

    kinds: tuple[str, ...] = KINDS
    places: tuple[str, ...] = PLACES
    res: tuple[int, ...] | None = None  # native sides, e.g. (16, 8)
    blocks: tuple[int, ...] | None = None  # transformer blocks in forward order (SD v1: 0..15, mid = 6)
    max_res: int | None = None  # only calls whose attention grid has at most max_res x max_res positions

    def __post_init__(self):
        for name, value, known in (("kinds", self.kinds, KINDS), ("places", self.places, PLACES)):
            bad = [v for v in value if v not in known]
            if bad or isinstance(value, str):
                raise UserError(f"site selection {name} must be a subset of {', '.join(known)}, got {value!r}")
        for name in ("res", "blocks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, (str, int)) or any(int(v) < 0 for v in value)):
                raise UserError(f"site selection {name} must be a list of non-negative integers, got {value!r}")
        if self.max_res is not None and self.max_res < 1:
            raise UserError(f"site selection max_res must be a positive side (or None for no cap), got {self.max_res}")

    def selects(self, site: Site, hw: tuple[int, int]) -> bool:
        """Whether `site`, called on an attention grid of hw = (h, w), is in the selection."""
        return (site.kind in self.kinds and site.place in self.places
                and (self.res is None or site.res in self.res)
                and (self.blocks is None or site.block in self.blocks)
                and (self.max_res is None or hw[0] * hw[1] <= self.max_res ** 2))

    def describe(self) -> str:
        parts = [f"{'/'.join(self.kinds)}-attention", f"in {'/'.join(self.places)}"]
        if self.res is not None:
            parts.append(f"at res {'/'.join(map(str, self.res))}")
        if self.blocks is not None:
            parts.append(f"blocks {','.join(map(str, self.blocks))}")
        if self.max_res is not None:
            parts.append(f"up to {self.max_res}x{self.max_res}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> SiteSelection:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


ALL_SITES = SiteSelection()


@dataclass(frozen=True)
class P2PDefaults:
    """The resolution-dependent choices of the authors, as native sides of attention grids."""

    blend_res: int  # local blend reads the cross-attention maps of this native side
    self_max_res: int | None  # self-attention is injected where the grid has at most this side
    store_max_res: int | None  # the attention store keeps the layers up to this side

    @property
    def blend_sites(self) -> SiteSelection:
        return SiteSelection(kinds=("cross",), res=(self.blend_res,))

    @property
    def self_sites(self) -> SiteSelection:
        return SiteSelection(max_res=self.self_max_res)

    @property
    def store_sites(self) -> SiteSelection:
        return SiteSelection(max_res=self.store_max_res)


# (family, native latent side) -> defaults. The first two rows are the authors' notebooks; a model of
# another size (a fine-tune at 768 px, a diffusers folder with another sample_size) takes its family's
# full-size row scaled to its latent side.
P2P_DEFAULTS: dict[tuple[str, int], P2PDefaults] = {
    ("sd-v1", 64): P2PDefaults(16, 16, 32),  # SD v1 at 512 px: blend 16x16 maps, self <= 16**2 keys, store <= 32**2
    ("ldm", 32): P2PDefaults(16, 16, 16),  # LDM at 256 px: the same 16x16 maps, store <= 16**2 (their LDM notebook)
    ("sd-v1", 16): P2PDefaults(8, 8, 16),  # the embedded model: its middle level, as 16 is SD's (blend 8x8 maps)
    ("sd-v1", 8): P2PDefaults(2, 16, 32),  # the "tiny" test preset: SD's caps (every layer), blend one level down
    ("ldm", 8): P2PDefaults(4, 4, 4),  # the "tiny-ldm" test preset
    # SD 2.x-base at 512 px has SD v1's grids (64/32/16/8): the authors' numbers select the same 16 layers.
    ("sd-v2", 64): P2PDefaults(16, 16, 32),
    # SD 2.x (768-v) has 96/48/24/12 grids and no 16x16 layer. The authors' rule, read at 512 px, is "blend from the
    # latent/4 level, inject self-attention at latent/4 and below": at 96 that is the 24x24 level (the same five
    # cross layers, down_blocks.2 and up_blocks.1, and the same six self layers with the 12x12 mid block).
    # Taken literally, 16 would inject into the mid block only and find no map to blend. The store keeps <= 24x24,
    # not latent/2 = 48x48: a 48x48 self map is 2304^2 x 10 heads = 53 M values per image row and site, 6.3x SD v1's
    # 32x32 one (1024^2 x 8), and nothing the edit or `p2p attention` reads by default lies above 24x24.
    ("sd-v2", 96): P2PDefaults(24, 24, 24),
    ("sd-v2", 8): P2PDefaults(2, 16, 32),  # the "tiny-sd2" test preset, as "tiny"
    # SDXL at 1024 px: a 128x128 latent, attention only at 64x64 (10 self + 10 cross sites) and 32x32 (60 + 60), no
    # 16x16 layer. The authors' rule read as latent/4 (as for SD 2.x at 768) gives the 32x32 level for everything:
    # the blend reads its 60 cross maps (down_blocks.2, mid, up_blocks.0; RoyiRa's SDXL port's attn_res rule selects
    # the same), self-attention is injected in its 60 layers (at most 32^2 keys), and the store keeps only them.
    # Read literally, "16x16" would select no layer at all: no map to blend and no self-injection. The 64x64 level
    # is left alone: a self map there is 4096^2 x 10 heads = 168 M values per image row and site (8x one at 32x32).
    ("sdxl", 128): P2PDefaults(32, 32, 32),
    # The "tiny-sdxl" test preset (8x8 latent, grids 4 and 2): the same rule, latent/4 = 2.
    ("sdxl", 8): P2PDefaults(2, 2, 2),
}
FULL_SIZE = {"sd-v1": 64, "sd-v2": 96, "ldm": 32, "sdxl": 128}


def p2p_defaults(cfg: ModelConfig) -> P2PDefaults:
    """The defaults for a model: its row of P2P_DEFAULTS, or its family's full-size row scaled to its latent."""
    side = cfg.unet.sample_size
    if (cfg.family, side) in P2P_DEFAULTS:
        return P2P_DEFAULTS[cfg.family, side]
    full = FULL_SIZE.get(cfg.family)
    if full is None:
        raise UserError(f"no Prompt-to-Prompt defaults for the {cfg.family!r} family; add a row to P2P_DEFAULTS")
    d = P2P_DEFAULTS[cfg.family, full]
    scale = lambda r: max(r * side // full, 1)  # noqa: E731
    return P2PDefaults(scale(d.blend_res), scale(d.self_max_res), scale(d.store_max_res))
