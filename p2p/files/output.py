"""Images out: files that carry the settings that reproduce them, and captioned contact sheets.

Every image the project writes goes through `save_image`: written to a temporary name next to the
destination and renamed when complete (an interrupted run leaves no half-written file), in the format
its suffix names (PNG, JPEG or WebP; anything else is refused), with the settings as JSON under the key
"p2p" (a PNG text chunk; the comment of a JPEG; WebP has no text field and carries none).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from models.errors import UserError

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
LINE_H, PAD, MAX_LINES = 12, 3, 8  # caption line height and margin (px), lines before a caption is cut short
_FONT = None
MIN_TILE = 128  # sheets show tiles at least this wide (the embedded model's 64 px images are magnified)


def image_format(path: str | Path, flag: str = "an image") -> str:
    """The PIL format a file name asks for; a UserError naming the supported suffixes otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        what = f"{flag} {path}" if flag.startswith("--") else f"{flag} named {str(path)!r}"
        raise UserError(f"cannot write {what}: {repr(suffix) if suffix else 'a name without a suffix'} is not "
                        f"an image format p2p writes; use a name ending in {', '.join(FORMATS)}")
    return FORMATS[suffix]


def check_output(path: str | Path, *, folder: bool = False, flag: str | None = None,
                 suffixes: tuple[str, ...] | None = None) -> Path:
    """Refuse, before any work, an output path that cannot be written: a file where a folder is wanted,
    a folder where a file is wanted, an unsupported suffix (an image's by default; `suffixes` for another
    kind of file), a parent that is a file. `flag` names the option in messages."""
    path = Path(path)
    flag = flag or ("--out-dir" if folder else "--out")
    if folder:
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path} is a file, not a folder: choose a folder name")
    else:
        if path.is_dir():
            example = path / ("image.png" if suffixes is None else "output" + suffixes[0])
            raise UserError(f"{flag} {path} is a folder: give a file name, e.g. {example}")
        if suffixes is None:
            image_format(path, flag)
        elif path.suffix.lower() not in suffixes:
            raise UserError(f"{flag} {path}: the file is written as {suffixes[0]}; give a name ending in "
                            f"{', '.join(suffixes)}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {path}: {parent} is a file, not a folder")
            break
    return path


@contextmanager
def staged_folder(path: str | Path):
    """A folder that appears complete or not at all: the block writes into a temporary sibling folder
    (yielded), whose files are moved into `path` when the block ends normally; on any error or Ctrl-C
    the temporary folder is deleted and `path` is left as it was."""
    path = Path(path)
    anchor = next(p for p in path.parents if p.exists())  # the temporary folder must be on path's file system
    tmp = anchor / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # (not mkdtemp: its folder is private, 0700, and would stay so once renamed)
    try:
        yield tmp
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.replace(tmp, path)  # one rename: the whole folder appears at once
        else:
            _move_into(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(src: Path, dst: Path) -> None:
    """Move the files of src into the existing folder dst (replacing files of the same name)."""
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir() and target.is_dir():
            _move_into(item, target)
        else:
            os.replace(item, target)


def save_image(image: Image.Image, path: str | Path, settings: dict) -> Path:
    """Write `image` atomically in the format of the path's suffix, with `settings` in its metadata."""
    path = Path(path)
    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, sort_keys=True)
    extra = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("p2p", text)
        extra["pnginfo"] = info
    elif fmt == "JPEG":
        extra.update(comment=f"p2p {text}".encode(), quality=95)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.convert("RGB").save(tmp, format=fmt, **extra)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_settings(path: str | Path) -> dict:
    """The settings stored by `save_image` in a PNG or JPEG."""
    with Image.open(path) as img:
        text = img.info.get("p2p") or img.info.get("comment", b"").decode().removeprefix("p2p ")
    return json.loads(text) if text else {}


def font() -> ImageFont.ImageFont:
    """The captions' font: PIL's default (Aileron 10 px where FreeType is available, else a bitmap font)."""
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default()
    return _FONT


def text_width(text: str) -> float:
    return font().getlength(text)


def wrap(text: str, width: int, max_lines: int = MAX_LINES) -> list[str]:
    """Lines at most `width` pixels wide in the captions' font (measured: its letters are 2 to 10 px wide); a
    word wider than a line is cut; past `max_lines` the last line ends with "...", so a long prompt cannot
    make a band taller than the images. A bracketed group, e.g. a fader value "[snowy x-2]", is one word."""
    lines, line = [], ""
    for word in re.findall(r"\[[^\]]*\]|\S+", text):  # a bracketed group ("[snowy x2]") stays on one line
        while word and text_width(word) > width:  # cut off the longest head that fits (at least a letter)
            if line:
                lines.append(line)
                line = ""
            k = max([i for i in range(1, len(word)) if text_width(word[:i]) <= width] or [1])
            lines.append(word[:k])
            word = word[k:]
        candidate = f"{line} {word}".strip()
        if line and text_width(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines = [x for x in lines + [line] if x] or [""]
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and text_width(last + "...") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "..."]
    return lines


def grid(images: list[Image.Image], captions: list[str] | None = None, rows: int = 1,
         min_tile: int = MIN_TILE) -> Image.Image:
    """Images side by side (row-major), magnified to at least `min_tile` px wide (nearest neighbour, so
    pixels stay visible), with a caption band under each when captions are given: each caption wrapped to
    its tile's width (`wrap`), so neighbouring captions never run into each other."""
    w, h = images[0].size
    zoom = max(1, -(-min_tile // w))
    w, h = w * zoom, h * zoom
    wrapped = None if captions is None else [wrap(c, w - 2 * PAD) for c in captions]
    band = 0 if wrapped is None else LINE_H * max(len(lines) for lines in wrapped) + 2 * PAD
    cols = -(-len(images) // rows)
    out = Image.new("RGB", (cols * w, rows * (h + band)), "white")
    draw = ImageDraw.Draw(out)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + band)
        out.paste(img.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        if wrapped is not None:
            for k, line in enumerate(wrapped[i]):
                draw.text((x + PAD, y + h + PAD + LINE_H * k), line, fill="black", font=font())
    return out
