"""Init images and masks as Pillow images: reading any mode, and fitting them to the render size.

Torch-free, so that job validation can check images without importing torch; the pipeline turns
the results into tensors.
"""

import numpy as np
from PIL import Image

from .errors import InputError

ASPECT_TOLERANCE = 0.01  # init images whose aspect differs more than this are refused, not stretched


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


def open_image(path: str) -> Image.Image:
    """The image at `path`, fully read (the file is closed again)."""
    with Image.open(path) as im:
        im.load()
        return im.copy()
