"""Real images in: a photo file -> a square image of the model's size -> its latent z_0 (Sec. 4 of the
paper, "Real image editing", and the null-text notebook's `load_512` + `image2latent`).

    from p2p.files.images import load_image, encode_image
    image = load_image("cat.jpg", pipe.cfg.image_size)   # PIL, RGB, image_size x image_size
    z_0 = encode_image(pipe, image)                       # (1, 4, h, w): the VAE posterior mean, scaled

Preparation, in this order (the authors' `load_512` crops the centre square and resizes it as well):
  1. the file is decoded in full by PIL (PNG, JPEG, WebP, or any format PIL reads); EXIF orientation is
     applied, so a portrait photo stays upright;
  2. transparency is composited on white, then the image is converted to RGB;
  3. the centre square of side min(W, H) is cropped (the longer side loses (max - min) / 2 on each end);
  4. that square is resized to image_size x image_size with a Lanczos filter (antialiased downscaling).
An image whose shorter side is below image_size is refused rather than upscaled: upscaling invents no
detail, and the reconstruction PSNR of an inversion would then measure the upscaler.

The latent is E(x) the mean of the posterior q(z_0 | x) times the VAE's scaling factor, with x in [-1, 1]:
deterministic, as the authors' `vae.encode(x)['latent_dist'].mean * 0.18215`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import MissingFileError, UserError


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file completely (so a truncated file fails here, not later), RGB."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"no image at {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an image file")
    try:
        with Image.open(path) as img:
            img.load()  # decodes every pixel: a truncated PNG/JPEG raises here
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image file PIL can read (use a PNG, JPEG or WebP image)") from None
    except PermissionError:
        raise UserError(f"cannot read {path}: permission denied (check the file's permissions)") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL: "image file is truncated", broken chunks, bad headers
        raise UserError(f"cannot decode the image {path}: {e}; the file is truncated or corrupt, "
                        "re-export or re-download it") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def square(img: Image.Image, size: int, *, what: str = "the image") -> Image.Image:
    """The centre square of `img`, resized to size x size (Lanczos); refuses images smaller than size."""
    w, h = img.size
    if min(w, h) < size:
        raise UserError(f"{what} is {w}x{h} pixels, smaller than the model's {size}x{size}: give an image at "
                        f"least {size} pixels on its shorter side (it is centre-cropped to a square and "
                        f"resized to {size}x{size})")
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.LANCZOS)


def load_image(source: str | Path | Image.Image, size: int) -> Image.Image:
    """A path or a PIL image -> the RGB size x size image the model sees (steps 1-4 of the module doc)."""
    if isinstance(source, Image.Image):
        return square(to_rgb(ImageOps.exif_transpose(source)), size)
    return square(open_image(source), size, what=f"the image {source}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> (1, 3, H, W) float32 in [-1, 1] (the inverse of pipeline.to_images up to rounding)."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """z_0 = scaling_factor * mean of q(z | x): (1, 4, H/8, W/8), float32 on the CPU."""
    x = to_tensor(image).to(pipe.device, pipe.dtype)
    return pipe.vae.encode(x).float().cpu()


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images, 10 log10(255^2 / MSE); inf when equal."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images of different shapes {a.shape} and {b.shape}")
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
