"""PNG files that carry their recipe: A1111's `parameters` text and our `sdbatch` JSON chunk."""

import io
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..images import read_image
from ..text import printable


def png_bytes(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)  # tEXt, or iTXt when the text is not Latin-1 (as A1111 does)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of an image (tEXt, zTXt, iTXt), read under the image limits of
    `sdbatch.images` (size, decompression bombs, damage): InputError saying why, never a crash."""
    text = read_image(path, lambda im: dict(getattr(im, "text", {}) or {}), printable(str(path)))
    return {str(k): str(v) for k, v in text.items() if isinstance(k, str) and isinstance(v, str)}
