"""Rendering a batch of recipes on one device: start modes (start), guidance rows (guidance),
decoding (decode), image tensors (images), and the Pipeline that ties them together."""

from ..images import ASPECT_TOLERANCE, fit, to_rgb
from .decode import tiled_decode, upcast
from .images import image_tensor, mask_tensor, to_pil
from .pipeline import Pipeline, Request, RequestError, Result, Tuning

__all__ = [
    "ASPECT_TOLERANCE",
    "Pipeline",
    "Request",
    "RequestError",
    "Result",
    "Tuning",
    "fit",
    "image_tensor",
    "mask_tensor",
    "tiled_decode",
    "to_pil",
    "to_rgb",
    "upcast",
]
