"""Init images and masks as Pillow images: reading any mode, and fitting them to the render size.

Torch-free, so that job validation can check images without importing torch; the pipeline turns
the results into tensors.
"""

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from .errors import InputError

ASPECT_TOLERANCE = 0.01  # init images whose aspect differs more than this are refused, not stretched
# Images larger than this are refused before their pixels are decoded: a few KB of PNG can claim
# 30000x30000 pixels (a "decompression bomb"). 100 megapixels is a 12000x8000 photograph.
MAX_IMAGE_PIXELS = 100_000_000
T = TypeVar("T")


class ImageError(InputError):
    """An init image or mask that cannot be used as given."""


def aspect_differs(image_size: tuple[int, int], size: tuple[int, int]) -> bool:
    (w, h), (width, height) = image_size, size
    return abs((w / h) / (width / height) - 1) > ASPECT_TOLERANCE


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: transparency flattened onto white, 16-bit scaled (not clipped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(values / 65535 * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def fit(image: Image.Image, width: int, height: int, what: str) -> Image.Image:
    """Resize to the requested size when only the scale differs; refuse a different aspect ratio,
    since stretching or cropping it silently would change the picture the user asked for."""
    if image.size == (width, height):
        return image
    w, h = image.size
    if aspect_differs((w, h), (width, height)):
        raise ImageError(
            f"{what} is {w}x{h} but the size asked for is {width}x{height}: the aspect ratios differ, and sdbatch "
            f"never crops or stretches silently. Crop the image, or ask for a size of the same shape "
            f"(e.g. [{w // 8 * 8}, {h // 8 * 8}])"
        )
    return image.resize((width, height), Image.Resampling.LANCZOS)


def open_image(path: str | Path, what: str | None = None) -> Image.Image:
    """The image at `path`, fully decoded (the file is closed again); ImageError saying why when
    it is missing, not an image, truncated, damaged, or larger than MAX_IMAGE_PIXELS."""
    what = what or str(path)
    image = read_image(path, lambda im: im.copy(), what)
    try:
        to_rgb(image.crop((0, 0, 1, 1)))  # a mode that cannot become RGB (LAB, say) fails here, not mid-job
    except Exception as e:
        raise ImageError(f"{what}: an image of mode {image.mode}, which cannot become RGB ({_first_line(e)})") from None
    return image


def read_image(path: str | Path, take: Callable[[Image.Image], T], what: str | None = None) -> T:
    """`take(image)` of the image at `path` once its size is known to be at most MAX_IMAGE_PIXELS
    and its pixels are decoded (so text chunks after the pixel data are read too); ImageError
    saying why for a missing, damaged, truncated or oversized file. Pillow's own bomb limits
    apply on top, and its warning is silenced since this limit is the one that counts."""
    what = what or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageError(_too_large(what, f"{w}x{h} = {w * h:,} pixels"))
                im.load()
                return take(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{what}: is a folder, not an image") from None
    except PermissionError:
        raise ImageError(f"{what}: cannot be read (permission denied)") from None
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageError(_too_large(what, f"{int(m[1]):,} pixels" if m else "too many pixels")) from None
    except Exception as e:  # Pillow's decoders raise many types on a damaged file
        raise ImageError(f"{what}: not an image Pillow can read ({_first_line(e)})") from None


def _too_large(what: str, size: str) -> str:
    return f"{what}: {size}, more than the {MAX_IMAGE_PIXELS:,} an image may have (a decompression bomb?)"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
