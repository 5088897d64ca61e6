"""Procedural scenes: one or two flat objects on a background, with a caption from a small grammar.

    from p2p.world import scenes
    scene = scenes.sample_scene(np.random.default_rng(0))
    scenes.caption(scene)                 # 'a big red striped square and a small blue circle on a green background'
    image, masks = scenes.render(scene)   # 64x64 RGB PIL image, (n_things, 64, 64) bool visible masks
    scenes.with_attribute(scene, 0, "colour", "yellow")     # the same scene with thing 0 recoloured

Grammar: "a {size} {colour} [{pattern}] {shape}" per object, joined by " and ", then
" on a {background} background"; the pattern "plain" is not written. Every attribute value is one
lowercase word, so that a word swap in the prompt is a swap of one token.

Geometry is in units of the image side: a thing's centre (cx, cy) and its radius r (every shape fits in
a circle of radius 1.06 r around the centre; "small" and "big" are disjoint ranges of r). `angle` is a
small rotation in degrees from the shape's upright pose (squares stay squares, diamonds stay diamonds);
stripes and dots turn with it. Things are drawn in order, later ones on top; two things are placed so
that their bounding circles do not overlap. The background is a shade of its named colour: plain, a
vertical or diagonal gradient between two shades, or a light value-noise texture, all fixed by bg_seed.

Rendering is antialiased: each object's coverage (and its pattern's) is drawn at `supersample` times the
resolution and box-averaged down, then composited over the background.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {  # name -> RGB; chosen far apart, also from each other's lighter/darker background shades
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
    "white": (240, 240, 240),
}
PATTERNS = ("plain", "striped", "dotted")
SIZES = ("small", "big")
BG_KINDS = ("plain", "gradient", "noise")
ATTRIBUTES = ("shape", "colour", "pattern", "size")  # per thing; "background" and "bg_kind" are per scene

RADIUS = {"small": (0.10, 0.14), "big": (0.19, 0.25)}  # r ranges, in image sides
EXTENT = 1.06  # every shape lies within EXTENT * r of its centre
MARGIN = 0.03  # free border around the bounding circle, in image sides
ANGLE_JITTER = 12.0  # degrees
DOT_RADIUS = 1.55  # of a dot, in final pixels


def pattern_period(r: float, size: int) -> float:
    """Period of stripes and dots in final pixels: a little larger on larger objects (radius r, image size)."""
    return float(np.clip(0.42 * r * size, 4.5, 7.0))
PATTERN_SHADE = 0.5  # stripes and dots are the object colour times this


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    pattern: str
    size: str
    cx: float  # centre, in image sides, from the left
    cy: float  # centre, in image sides, from the top
    r: float  # radius, in image sides
    angle: float  # degrees, counter-clockwise from the shape's upright pose


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: str
    bg_kind: str
    bg_seed: int


# --- sampling ---------------------------------------------------------------------------------------------

def _centre_range(r: float) -> tuple[float, float]:
    m = EXTENT * r + MARGIN
    return m, 1.0 - m


def _apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Bounding circles (cx, cy, r) do not overlap."""
    return math.hypot(a[0] - b[0], a[1] - b[1]) >= EXTENT * (a[2] + b[2])


def sample_scene(rng: np.random.Generator, max_things: int = 2, p_two: float = 0.3) -> Scene:
    """A random scene: with probability p_two (if max_things >= 2) 2..max_things things, else one.

    Attributes are uniform; an object never takes the background's colour. Positions are uniform in the
    region that keeps the object inside the image, redrawn until the things do not overlap (after many
    failures the radii are redrawn in their size classes too, which matters only for several big things)."""
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    bg_kind = BG_KINDS[rng.integers(len(BG_KINDS))]
    bg_seed = int(rng.integers(2**31))
    n = 1
    if max_things >= 2 and rng.random() < p_two:
        n = int(rng.integers(2, max_things + 1))
    others = [c for c in names if c != background]
    attrs = []
    for _ in range(n):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = others[rng.integers(len(others))]
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        size = SIZES[rng.integers(len(SIZES))]
        attrs.append((shape, colour, pattern, size, float(rng.uniform(-ANGLE_JITTER, ANGLE_JITTER))))
    for attempt in range(10_000):  # place all things together: redraw every position until none overlap
        if attempt % 50 == 0:
            rs = [float(rng.uniform(*RADIUS[a[3]])) for a in attrs]
        xy = [tuple(float(v) for v in rng.uniform(*_centre_range(r), size=2)) for r in rs]
        circles = [(x, y, r) for (x, y), r in zip(xy, rs)]
        if all(_apart(circles[i], circles[j]) for i in range(n) for j in range(i)):
            break
    else:
        raise RuntimeError(f"cannot place {n} things without overlap")
    things = [Thing(s, c, p, z, x, y, r, a) for (s, c, p, z, a), (x, y, r) in zip(attrs, circles)]
    return Scene(tuple(things), background, bg_kind, bg_seed)


def caption(scene: Scene) -> str:
    def phrase(t: Thing) -> str:
        words = ["a", t.size, t.colour] + ([t.pattern] if t.pattern != "plain" else []) + [t.shape]
        return " ".join(words)
    return " and ".join(phrase(t) for t in scene.things) + f" on a {scene.background} background"


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted."""
    words = {"a", "and", "on", "background", *SHAPES, *COLOURS, *SIZES, *(p for p in PATTERNS if p != "plain")}
    return sorted(words)


def with_attribute(scene: Scene, index: int, attribute: str, value: str) -> Scene:
    """The scene with one attribute changed: thing `index`'s shape, colour, pattern or size, or (index ignored)
    the scene's background colour or bg_kind.

    A size change maps r to the same relative place in the other size range and moves the centre only as
    far as needed to keep the object inside the image. Raises ValueError for an unknown value, or for an
    object colour equal to the background colour."""
    allowed = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS, "size": SIZES,
               "background": tuple(COLOURS), "bg_kind": BG_KINDS}
    if attribute not in allowed:
        raise ValueError(f"unknown attribute {attribute!r} (known: {', '.join(allowed)})")
    if value not in allowed[attribute]:
        raise ValueError(f"unknown {attribute} {value!r} (known: {', '.join(allowed[attribute])})")
    if attribute == "background":
        if any(t.colour == value for t in scene.things):
            raise ValueError(f"an object is {value}: it cannot be the background colour")
        return replace(scene, background=value)
    if attribute == "bg_kind":
        return replace(scene, bg_kind=value)
    if attribute == "colour" and value == scene.background:
        raise ValueError(f"the background is {value}: an object cannot have its colour")
    t = scene.things[index]
    if attribute == "size" and value != t.size:
        (a0, a1), (b0, b1) = RADIUS[t.size], RADIUS[value]
        r = b0 + (t.r - a0) / (a1 - a0) * (b1 - b0)
        lo, hi = _centre_range(r)
        t = replace(t, size=value, r=r, cx=min(max(t.cx, lo), hi), cy=min(max(t.cy, lo), hi))
    else:
        t = replace(t, **{attribute: value})
    return replace(scene, things=scene.things[:index] + (t,) + scene.things[index + 1:])


# --- rendering --------------------------------------------------------------------------------------------

def shade(rgb, t: float) -> np.ndarray:
    """Lighter (t > 0, towards white) or darker (t < 0, towards black) shade of a colour, float RGB."""
    c = np.asarray(rgb, np.float32)
    return c + t * (255.0 - c) if t > 0 else c * (1.0 + t)


def pattern_colour(colour: str) -> np.ndarray:
    return np.asarray(COLOURS[colour], np.float32) * PATTERN_SHADE


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a random (cells+1)^2 grid, bilinearly upsampled to (size, size)."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    x = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(x.astype(int), cells - 1)
    f = x - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def background_array(scene: Scene, size: int = 64) -> np.ndarray:
    """(size, size, 3) float32 background in [0, 255]; its randomness comes from bg_seed only."""
    rng = np.random.default_rng(scene.bg_seed)
    base = COLOURS[scene.background]
    t0 = float(rng.uniform(-0.15, 0.15))
    if scene.bg_kind == "plain":
        return np.broadcast_to(shade(base, t0), (size, size, 3)).astype(np.float32)
    if scene.bg_kind == "gradient":
        t1 = float(np.clip(t0 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.25), -0.3, 0.3))
        theta = math.radians(rng.choice([90.0, 45.0, 135.0]) + rng.uniform(-10, 10))  # vertical or diagonal
        y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) - 0.5
        s = x * math.cos(theta) + y * math.sin(theta)
        s = (s - s.min()) / (s.max() - s.min())
        c0, c1 = shade(base, t0), shade(base, t1)
        return (c0 * (1 - s[..., None]) + c1 * s[..., None]).astype(np.float32)
    if scene.bg_kind == "noise":
        amp = 255.0 * float(rng.uniform(0.04, 0.07))
        n = _value_noise(rng, size, int(rng.integers(4, 9))) + 0.3 * rng.uniform(-1, 1, size=(size, size))
        return np.clip(shade(base, t0) + amp * n[..., None].astype(np.float32), 0, 255)
    raise ValueError(f"unknown background kind {scene.bg_kind!r}")


def _outline(t: Thing) -> tuple[str, list[tuple[float, float]] | float]:
    """("circle", radius) or ("polygon", [(x, y), ...]) around (0, 0), in image sides, y pointing down."""
    r = t.r
    if t.shape == "circle":
        return "circle", 0.85 * r
    if t.shape == "square":
        pts = [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]
    elif t.shape == "diamond":
        pts = [(0.0, -1.05), (0.72, 0.0), (0.0, 1.05), (-0.72, 0.0)]
    elif t.shape == "triangle":  # equilateral, apex up, centred on its centroid
        pts = [(1.05 * math.cos(a), -1.05 * math.sin(a)) for a in np.radians([90, 210, 330])]
    elif t.shape == "star":  # five points, inner radius 0.45 of the outer
        pts = [((1.05 if k % 2 == 0 else 0.47) * math.cos(a), -(1.05 if k % 2 == 0 else 0.47) * math.sin(a))
               for k, a in enumerate(np.radians(90 + 36 * np.arange(10)))]
    else:
        raise ValueError(f"unknown shape {t.shape!r}")
    a = math.radians(t.angle)
    c, s = math.cos(a), math.sin(a)  # counter-clockwise on screen (y down)
    return "polygon", [(r * (c * x + s * y), r * (-s * x + c * y)) for x, y in pts]


def _coverage(t: Thing, size: int, ss: int):
    """Antialiased coverage of thing t on its pixel box: (y0, x0, alpha, pattern_alpha), floats in [0, 1]."""
    ext = EXTENT * t.r * size + 1
    x0, x1 = max(0, int(math.floor(t.cx * size - ext))), min(size, int(math.ceil(t.cx * size + ext)))
    y0, y1 = max(0, int(math.floor(t.cy * size - ext))), min(size, int(math.ceil(t.cy * size + ext)))
    w, h = x1 - x0, y1 - y0
    # centre in supersampled box coordinates (pixel (i, j) covers [j, j+1) x [i, i+1))
    ocx, ocy = (t.cx * size - x0) * ss, (t.cy * size - y0) * ss
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    kind, geo = _outline(t)
    k = size * ss
    if kind == "circle":
        rr = geo * k
        draw.ellipse([ocx - rr, ocy - rr, ocx + rr, ocy + rr], fill=255)
    else:
        draw.polygon([(ocx + x * k, ocy + y * k) for x, y in geo], fill=255)
    shape = np.asarray(canvas, np.float32) / 255.0
    alpha = _box(shape, ss)
    if t.pattern == "plain":
        return y0, x0, alpha, np.zeros_like(alpha)
    # pattern in the object's frame, periods in final pixels, scaled a little with the object
    period = pattern_period(t.r, size)
    js = (np.arange(w * ss, dtype=np.float32) + 0.5 - ocx) / ss
    is_ = (np.arange(h * ss, dtype=np.float32) + 0.5 - ocy) / ss
    a = math.radians(t.angle)
    c, s = math.cos(a), math.sin(a)
    u = js[None, :] * c - is_[:, None] * s
    v = js[None, :] * s + is_[:, None] * c
    if t.pattern == "striped":
        pat = np.mod(v / period + 0.25, 1.0) < 0.5
    elif t.pattern == "dotted":
        du = np.mod(u / period + 0.5, 1.0) - 0.5
        dv = np.mod(v / period + 0.5, 1.0) - 0.5
        pat = du * du + dv * dv < (DOT_RADIUS / period) ** 2
    else:
        raise ValueError(f"unknown pattern {t.pattern!r}")
    return y0, x0, alpha, _box(shape * pat, ss)


def _box(a: np.ndarray, ss: int) -> np.ndarray:
    h, w = a.shape[0] // ss, a.shape[1] // ss
    return a.reshape(h, ss, w, ss).mean(axis=(1, 3))


def render(scene: Scene, size: int = 64, supersample: int = 4) -> tuple[Image.Image, np.ndarray]:
    """The scene as a (size x size) RGB image, and the visible mask of each thing, (n_things, size, size) bool:
    the pixels at least half covered by the thing and less than half by any thing drawn after it."""
    img = background_array(scene, size).copy()
    alphas = np.zeros((len(scene.things), size, size), np.float32)
    for n, t in enumerate(scene.things):
        y0, x0, alpha, pat = _coverage(t, size, supersample)
        h, w = alpha.shape
        region = img[y0:y0 + h, x0:x0 + w]
        col, dark = np.asarray(COLOURS[t.colour], np.float32), pattern_colour(t.colour)
        region *= (1 - alpha)[..., None]
        region += (alpha - pat)[..., None] * col + pat[..., None] * dark
        alphas[n, y0:y0 + h, x0:x0 + w] = alpha
    masks = alphas >= 0.5
    for n in range(len(masks) - 2, -1, -1):
        masks[n] &= ~masks[n + 1:].any(axis=0)
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return image, masks


def sample(n: int, seed: int, max_things: int = 2, p_two: float = 0.3) -> list[tuple[Image.Image, str, Scene]]:
    """n (image, caption, scene) triples, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, max_things, p_two)
        out.append((render(scene)[0], caption(scene), scene))
    return out
