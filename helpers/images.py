"""Reading images the way every model here wants them: RGB on white, square, as tensors in [-1, 1]."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class BadImageError(ValueError):
    """An image file that is missing or cannot be decoded; the message names the file."""


def load_rgb(path: str | Path) -> Image.Image:
    """Open any image PIL can read as 8-bit RGB, compositing transparency onto white.

    16-bit greyscale (I;16*, and I holding 0..65535) is scaled by 1/257, float (F) holding 0..1 by 255;
    modes or values that have no faithful RGB reading are a BadImageError naming the file and mode."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{path}: cannot decode image ({e})") from None
    return to_rgb(im, path)


def to_rgb(im: Image.Image, path: str | Path) -> Image.Image:
    """`im` (read from `path`, named in errors) as 8-bit RGB on white; see load_rgb."""
    if im.mode in _WIDE_MODES:
        im = _wide_to_8bit(im, path)
    if im.mode in _REJECTED_MODES:
        raise BadImageError(f"{path}: image mode {im.mode} ({_REJECTED_MODES[im.mode]}) has no faithful RGB "
                            "reading; save it as RGB or RGBA")
    try:
        if im.mode in ("La", "RGBa"):  # premultiplied alpha
            im = im.convert("LA" if im.mode == "La" else "RGBA")
        if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(f"{path}: image mode {im.mode} cannot be converted to RGB ({e})") from None


# 16/32-bit integer and float modes: PIL's own convert("RGB") clips them to 255 (a 16-bit grey of 10000 -> white)
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F")
_REJECTED_MODES = {"LAB": "CIE L*a*b*", "I;32": "32-bit", "I;32B": "32-bit"}


def _wide_to_8bit(im: Image.Image, path: Path) -> Image.Image:
    arr = np.asarray(im).astype(np.float64)
    if not np.isfinite(arr).all():
        raise BadImageError(f"{path}: image mode {im.mode} holds NaN or infinite values")
    low, high = float(arr.min()), float(arr.max())
    if im.mode == "F":
        if low < 0 or high > 1:
            raise BadImageError(f"{path}: float image (mode F) with values in [{low:g}, {high:g}]; "
                                "expected [0, 1] (save it as 8-bit RGB)")
        arr = arr * 255
    else:
        if low < 0 or high > 65535:
            raise BadImageError(f"{path}: {im.mode} image with values in [{low:g}, {high:g}]; expected 16-bit "
                                "values 0..65535 (save it as 8-bit RGB)")
        arr = arr / 257
    return Image.fromarray(np.round(arr).astype(np.uint8), "L")


def square_resize(im: Image.Image, size: int) -> Image.Image:
    """Pad to a square on white (sprites must not be stretched), then resize with antialiasing."""
    w, h = im.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        im = canvas
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.LANCZOS if size < im.size[0] else Image.Resampling.BICUBIC)
    return im


# A pixel is content when any channel is below this: antialiased edges, JPEG noise and near-white haze
# (253, 254) around a sprite count as background, so the crop does not stop at invisible specks.
CONTENT_BELOW = 250


def crop_to_content(im: Image.Image, below: int = CONTENT_BELOW) -> Image.Image:
    """Crop an RGB image (transparency already composited onto white) to the box of its non-white pixels.

    A pixel is content when any channel is < `below`. An all-white image is returned whole: it has
    no box to crop to, and keeping it lets it go through padding and resizing like any other.
    """
    content = (np.asarray(im.convert("RGB")) < below).any(axis=-1)
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if len(rows) == 0:
        return im
    return im.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


def load_image_tensor(path: str | Path, size: int, crop: bool = False) -> torch.Tensor:
    """3×size×size float tensor in [-1, 1]; `crop`: first crop to the content box (config `crop_to_content`)."""
    im = load_rgb(path)
    return pil_to_tensor(square_resize(crop_to_content(im) if crop else im, size))


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Inverse of pil_to_tensor for one 3×H×W image in [-1, 1]; NaNs become black so they show."""
    x = torch.nan_to_num(x.detach().float().cpu(), nan=-1.0).clamp(-1, 1)
    arr = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


READABLE_PX = 96  # the smallest cell a sprite is shown at when the caller names no size


def pixel_cell(size: int, cell: int | None = None) -> int:
    """The cell an image of `size` px is shown in: `size` × the whole factor nearest to `cell` (default: the
    smallest multiple of `size` ≥ READABLE_PX), so every source pixel becomes the same square of screen pixels.
    A `cell` below `size` is kept as is: shrinking has no whole factor."""
    if cell is not None and cell < size:
        return cell
    factor = max(1, round(cell / size)) if cell else -(-READABLE_PX // size)
    return size * factor


def upscale(im: Image.Image, cell: int) -> Image.Image:
    """`im` at `cell`×`cell`: nearest-neighbour when enlarging by a whole factor (pixel art stays pixels, no
    invented colours), Lanczos when shrinking, bicubic otherwise."""
    if im.size == (cell, cell):
        return im
    w = im.size[0]
    method = (Image.Resampling.LANCZOS if w > cell else
              Image.Resampling.NEAREST if cell % w == 0 else Image.Resampling.BICUBIC)
    return im.resize((cell, cell), method)


def image_grid(images: list[Image.Image], cols: int, cell: int | None = None, gap: int = 0) -> Image.Image:
    """Tile PIL images into one picture, each scaled by a whole factor to about `cell` px (see pixel_cell), `gap`
    white pixels between them (so that sprites on white do not run into each other)."""
    cell = pixel_cell(images[0].size[0], cell)
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * cell + (cols - 1) * gap, rows * cell + (rows - 1) * gap), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(upscale(im, cell), ((i % cols) * (cell + gap), (i // cols) * (cell + gap)))
    return grid


def try_load_rgb(path: str | Path) -> tuple[Image.Image | None, str]:
    """(load_rgb(path), "") or (None, why it cannot be read): for previews, which must not stop at one bad file."""
    try:
        return load_rgb(path), ""
    except BadImageError as e:
        return None, str(e)
