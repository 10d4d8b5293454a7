"""Init images and masks as Pillow images: reading any mode, and fitting them to the render size.

Torch-free, so that job validation can check images without importing torch; the pipeline turns
the results into tensors.
"""

import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

ASPECT_TOLERANCE = 0.01  # init images whose aspect differs more than this are refused, not stretched
RESIZE_MODES = ("just", "crop", "fill")  # A1111's Just resize, Crop and resize, Resize and fill
# Images larger than this are refused before their pixels are decoded: a few KB of PNG can claim
# 30000x30000 pixels (a "decompression bomb"). 100 megapixels is a 12000x8000 photograph.
MAX_IMAGE_PIXELS = 100_000_000
MAX_READ_AT_ONCE = 256 * 2**20  # bytes: a larger file is decoded from disk and hashed in chunks
T = TypeVar("T")


class ImageError(InputError):
    """An init image or mask that cannot be used as given."""


def aspect_differs(image_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether resizing an image to `size` would visibly change its shape: the aspect ratios differ
    by more than 1 %, and `size` is not the image's shape rounded to multiples of 8 either (one
    scale s brings both sides within 4 pixels of it), which is what `size: from_image` gives."""
    (w, h), (width, height) = image_size, size
    if abs((w / h) / (width / height) - 1) <= ASPECT_TOLERANCE:
        return False
    return max((width - 4) / w, (height - 4) / h) > min((width + 4) / w, (height + 4) / h) + 1e-9


def round8(value: float) -> int:
    """The nearest multiple of 8 (halves up), at least 8."""
    return max(8, int(value / 8 + 0.5) * 8)


def size_from_image(image_size: tuple[int, int], kind: str, value: int | None = None) -> tuple[int, int]:
    """A render size of the image's own shape: `from_image` (its size), `width` or `height` (that
    side given, the other in proportion), `max_pixels` (the largest size of its shape with at most
    that many pixels: scaled down or up). Both sides are the image's, scaled by one factor and
    rounded to the nearest multiple of 8 (so `aspect_differs` accepts the result)."""
    w, h = image_size
    if kind == "width":
        return round8(value), round8(h * value / w)
    if kind == "height":
        return round8(w * value / h), round8(value)
    if kind == "max_pixels":
        scale = (value / (w * h)) ** 0.5
        while (round8(w * scale), round8(h * scale)) != (8, 8) and round8(w * scale) * round8(h * scale) > value:
            scale *= 0.995  # rounding up went over the budget: a little smaller
        return round8(w * scale), round8(h * scale)
    return round8(w), round8(h)


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


def fit(image: Image.Image, width: int, height: int, what: str, resize: str | None = None) -> Image.Image:
    """The image at the render size. `resize` unset: resized when only the scale differs (or the
    size is its shape rounded to multiples of 8), and refused when the aspect ratio differs, since
    stretching or cropping it silently would change the picture the user asked for. Otherwise
    A1111's resize modes (modules/images.py `resize_image`, without its optional upscaler):
    `just` stretches, `crop` scales to cover the size and keeps the centre, `fill` scales to fit
    inside it and fills the two borders with the image's edge rows (or columns) stretched."""
    if image.size == (width, height):
        return image
    w, h = image.size
    if resize is None and aspect_differs((w, h), (width, height)):
        raise ImageError(
            f"{what} is {w}x{h} but the size asked for is {width}x{height}: the aspect ratios differ, and sdbatch "
            f"never crops or stretches silently. Crop the image, ask for a size of the same shape "
            f"(e.g. [{w // 8 * 8}, {h // 8 * 8}] or size: from_image), or set resize: just, crop or fill"
        )
    if resize in (None, "just"):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    cover = (resize == "crop") == (width / height > w / h)  # scale to the width (else the height)
    inner = (width, max(1, h * width // w)) if cover else (max(1, w * height // h), height)
    left, top = inner[0] // 2 - width // 2, inner[1] // 2 - height // 2
    if resize == "crop" and inner[0] * inner[1] > 16 * width * height:
        # an extreme aspect (2000x1 to 512x512): resizing it whole first would take gigabytes; the
        # kept box straight to the size instead (the same pixels up to resampling)
        sx, sy = w / inner[0], h / inner[1]
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        return image.resize((width, height), Image.Resampling.LANCZOS, box=box)
    scaled = image.resize(inner, Image.Resampling.LANCZOS)
    if resize == "crop":
        return scaled.crop((left, top, left + width, top + height))
    out = Image.new(image.mode, (width, height))
    out.paste(scaled, (-left, -top))
    iw, ih = inner
    # the borders: A1111 stretches the first and last row (or column) over them; its second border
    # is as thick as the first, which leaves one black line when the leftover is odd: here it is filled
    if ih < height:
        bands = ((0, -top, (0, 0, iw, 0)), (ih - top, height - ih + top, (0, ih, iw, ih)))
        for at, size, box in bands:
            if size > 0:
                out.paste(scaled.resize((width, size), Image.Resampling.LANCZOS, box=box), (0, at))
    elif iw < width:
        bands = ((0, -left, (0, 0, 0, ih)), (iw - left, width - iw + left, (iw, 0, iw, ih)))
        for at, size, box in bands:
            if size > 0:
                out.paste(scaled.resize((size, height), Image.Resampling.LANCZOS, box=box), (at, 0))
    return out


def open_image(path: str | Path, what: str | None = None) -> Image.Image:
    """The image at `path`, fully decoded (the file is closed again); ImageError saying why when
    it is missing, not an image, truncated, damaged, or larger than MAX_IMAGE_PIXELS."""
    what = what or str(path)
    return _convertible(read_image(path, lambda im: im.copy(), what), what)


def _convertible(image: Image.Image, what: str) -> Image.Image:
    try:
        to_rgb(image.crop((0, 0, 1, 1)))  # a mode that cannot become RGB (LAB, say) fails here, not mid-job
    except Exception as e:
        raise ImageError(f"{what}: an image of mode {image.mode}, which cannot become RGB ({_first_line(e)})") from None
    return image


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime) -> sha256 of the bytes


def _stamp(path: str | Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def check_image(path: str | Path, what: str | None = None) -> tuple[int, int]:
    """The size of the image at `path`, after decoding it in full (a damaged or truncated file is an
    ImageError now, not halfway through a job). Its sha256 is taken from the same read and kept
    (`image_sha256`), so a task id never reads the file again; its pixels are not kept."""
    what = what or str(path)
    try:
        stamp = _stamp(path)
        data = Path(path).read_bytes() if stamp[1] <= MAX_READ_AT_ONCE else None
    except OSError:
        data = None
    if data is None:  # unreadable (open_image says why), or too large to hold: hashed apart when needed
        return open_image(path, what).size
    size = read_image(io.BytesIO(data), lambda im: _convertible(im, what).size, what)
    _DIGESTS[stamp] = hashlib.sha256(data).hexdigest()
    return size


def image_sha256(path: str | Path) -> str:
    """sha256 of an image file's bytes (what task ids use), remembered by (real path, size,
    mtime): the read that `check_image` made at validate time is the only one, and a file changed
    since is hashed again. Not kept on disk: every run decodes (and so reads) its images anyway."""
    stamp = _stamp(path)
    if stamp not in _DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _DIGESTS[stamp] = digest.hexdigest()
    return _DIGESTS[stamp]


def read_image(path: str | Path | io.BytesIO, take: Callable[[Image.Image], T], what: str | None = None) -> T:
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
                if im.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1):
                    return take(ImageOps.exif_transpose(im))  # as it is shown (phone photos), as A1111 does
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
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not an image Pillow can read (an unknown or damaged format)") from None
    except Exception as e:  # Pillow's decoders raise many types on a damaged file
        raise ImageError(f"{what}: not an image Pillow can read ({_first_line(e)})") from None


EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a camera held the picture


def _too_large(what: str, size: str) -> str:
    return f"{what}: {size}, more than the {MAX_IMAGE_PIXELS:,} an image may have (a decompression bomb?)"


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]
