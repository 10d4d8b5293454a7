"""PNG files that carry their recipe: A1111's `parameters` text and our `sdbatch` JSON chunk."""

import io
from pathlib import Path
from typing import Any

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
    `sdbatch.images` (size, decompression bombs, damage): InputError saying why, never a crash.
    A JPEG or WebP (A1111 saves those too, and civitai serves them) carries its infotext in the EXIF
    UserComment instead: it is returned as `parameters`, as A1111's read_info_from_image reads it."""

    def texts(im: Any) -> dict:
        found = dict(getattr(im, "text", {}) or {})
        if "parameters" not in found and (comment := _user_comment(im)):
            found["parameters"] = comment
        return found

    text = read_image(path, texts, printable(str(path)))
    return {str(k): str(v) for k, v in text.items() if isinstance(k, str) and isinstance(v, str)}


# piexif's UserComment prefixes (A1111 writes UNICODE: UTF-16 big-endian) -> the encoding of the rest
_COMMENT_ENCODINGS = {b"ASCII\0\0\0": "ascii", b"UNICODE\0": "utf_16_be", b"JIS\0\0\0\0\0": "shift_jis"}


def _user_comment(im: Any) -> str:
    """EXIF UserComment decoded as A1111 decodes it: piexif's UserComment.load (by its 8-byte
    prefix, bad bytes replaced), else the bytes as UTF-8 with bad ones dropped; "" for none."""
    try:
        raw = im.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
    except Exception:  # no EXIF, or EXIF Pillow cannot parse: no infotext there
        return ""
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes):
        return ""
    encoding = _COMMENT_ENCODINGS.get(raw[:8])
    if encoding is not None and len(raw) >= 8:
        return raw[8:].decode(encoding, errors="replace")
    return raw.decode("utf-8", errors="ignore")
