"""What is in a demo image: a deliberately simple judge of colour and shape, for adherence tests.

Background = the commonest colour on the border; foreground = pixels far from it; colour = the
named colour nearest the foreground's median; shape = how much of its bounding box the foreground
fills (square ~1, circle ~pi/4, triangle ~1/2). It is checked against the dataset's own renders
before it is trusted to judge the model's.
"""

import numpy as np
from PIL import Image

from .data import COLOURS

NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in NAMES], dtype=np.float64)
FOREGROUND_DISTANCE = 80.0  # RGB distance from the background above which a pixel is foreground


def nearest_colour(rgb: np.ndarray) -> str:
    return NAMES[int(np.argmin(((PALETTE - rgb) ** 2).sum(axis=1)))]


def _pixels_and_border(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """RGB pixels as floats, and the median colour of the border (where no shape is ever drawn)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return pixels, np.median(border, axis=0)


def background(image: Image.Image) -> str:
    """The named colour nearest the image's border."""
    return nearest_colour(_pixels_and_border(image)[1])


def foreground(image: Image.Image) -> np.ndarray:
    """(H, W) mask of the pixels far from the border's colour."""
    pixels, border = _pixels_and_border(image)
    return np.sqrt(((pixels - border) ** 2).sum(axis=2)) > FOREGROUND_DISTANCE


def judge(image: Image.Image) -> tuple[str | None, str | None]:
    """(colour, shape) of the main object, or None where there is no clear foreground."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    foreground_ = foreground(image)
    if foreground_.sum() < 0.01 * foreground_.size:
        return None, None
    colour = nearest_colour(np.median(pixels[foreground_], axis=0))
    rows, cols = np.nonzero(foreground_)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = foreground_.sum() / box
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return colour, shape
