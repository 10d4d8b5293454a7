"""PNG files that carry their recipe: A1111's `parameters` text and our `sdbatch` JSON chunk."""

import io
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..errors import InputError


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)  # tEXt, or iTXt when the text is not Latin-1 (as A1111 does)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def read_png_text(path: str | Path) -> dict[str, str]:
    try:
        with Image.open(path) as im:
            im.load()
            return dict(getattr(im, "text", {}) or {})
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: not an image Pillow can read ({e})") from None
