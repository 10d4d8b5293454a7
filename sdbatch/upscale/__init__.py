"""Upscaler models for the hires fix: ESRGAN's RRDBNet (ESRGAN, 4x-UltraSharp, Real-ESRGAN, ...).

files.py   what an upscaler file is (layout, scale, sizes), checked from its header: torch-free
esrgan.py  the network, and loading a file of any layout into it
apply.py   running it: tiled over a tensor, and on an image the way A1111's hires fix does

Importing this package imports no torch; `load_upscaler`, `RRDBNet`, `upscale_tensor` and
`upscale_image` import it on first use.
"""

from typing import TYPE_CHECKING

from .files import LAYOUTS, UpscalerError, UpscalerInfo, expected_shapes, read_upscaler

if TYPE_CHECKING:
    from .apply import upscale_image, upscale_tensor
    from .esrgan import RRDBNet, load_upscaler


def __getattr__(name: str):
    if name in ("RRDBNet", "load_upscaler"):
        from . import esrgan

        return getattr(esrgan, name)
    if name in ("upscale_image", "upscale_tensor"):
        from . import apply

        return getattr(apply, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LAYOUTS",
    "RRDBNet",
    "UpscalerError",
    "UpscalerInfo",
    "expected_shapes",
    "load_upscaler",
    "read_upscaler",
    "upscale_image",
    "upscale_tensor",
]
