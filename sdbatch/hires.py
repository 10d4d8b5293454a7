"""Hires fix, as A1111 runs it (`StableDiffusionProcessingTxt2Img`): names and sizes, torch-free.

A first pass renders at the recipe's size; its latents are upscaled (a latent mode), or its image is
decoded, upscaled (Lanczos, nearest, or an upscaler model) and encoded again; a second pass then
runs img2img on the result at the recipe's `strength` (A1111's "Denoising strength"), with fresh
noise from the same per-image seeds.

This module knows the upscalers' names (ours, and A1111's `Hires upscaler:` spellings) and the
second pass's size (A1111's `calculate_target_resolution`); the pixels are made in
`sdbatch.pipeline.hires` and `sdbatch.upscale`.
"""

import math
from dataclasses import dataclass

# latent modes: our name -> (A1111's name, torch interpolate mode, antialias); A1111's
# `shared.latent_upscale_modes`
LATENT = {
    "latent": ("Latent", "bilinear", False),
    "latent-antialiased": ("Latent (antialiased)", "bilinear", True),
    "latent-bicubic": ("Latent (bicubic)", "bicubic", False),
    "latent-bicubic-antialiased": ("Latent (bicubic antialiased)", "bicubic", True),
    "latent-nearest": ("Latent (nearest)", "nearest", False),
    "latent-nearest-exact": ("Latent (nearest-exact)", "nearest-exact", False),
}
# resizes of the decoded image: our name -> A1111's name ("None" resizes with Lanczos too)
PIXEL = {"lanczos": "Lanczos", "nearest": "Nearest", "none": "None"}
BUILTIN = {**{k: v[0] for k, v in LATENT.items()}, **PIXEL}  # our name -> A1111's
_BY_A1111 = {a1111.lower(): name for name, a1111 in BUILTIN.items()}
# A1111's names for the upscaler models it downloads itself -> the file stem it saves them as
A1111_MODELS = {
    "ESRGAN_4x": "ESRGAN_4x",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
}
# A1111's built-in upscalers of other network families (no RRDBNet): refused by name
UNSUPPORTED = ("LDSR", "SwinIR", "ScuNET", "DAT", "R-ESRGAN General", "R-ESRGAN AnimeVideo")


def unsupported(name: str) -> str | None:
    """Why A1111's upscaler `name` cannot run here, or None."""
    if any(name.startswith(family) for family in UNSUPPORTED):
        return f"A1111's {name} is not an ESRGAN (RRDBNet) model; sdbatch runs RRDBNet upscalers only"
    return None


def builtin(name: str) -> str | None:
    """Our name of a latent or pixel upscaler, in any of its spellings (`latent (bicubic)`,
    `Latent_bicubic`, `latent-bicubic`), or None for a model's name."""
    text = name.strip().lower()
    if text in _BY_A1111:
        return _BY_A1111[text]
    text = text.replace("(", "").replace(")", "").replace(" ", "-").replace("_", "-")
    return text if text in BUILTIN else None


def model_stem(name: str) -> str:
    """The file stem an upscaler model's name is looked up by (A1111's own names map to theirs)."""
    return A1111_MODELS.get(name, name)


def a1111_name(name: str) -> str:
    """What A1111's infotext says for this upscaler (`Latent (bicubic)`, or the model's name)."""
    return BUILTIN.get(name, name)


def is_latent(name: str) -> bool:
    return name in LATENT


@dataclass(frozen=True)
class Target:
    """The second pass's size. The first pass is upscaled to `upscale` (w, h), rounded down to whole
    8-pixel cells as A1111's latents are (int(512 * 1.3) = 665 -> 664); a resize of another aspect
    then crops `crop` (x, y) pixels, whole cells, off the upscaled latents, centred."""

    upscale: tuple[int, int]
    crop: tuple[int, int] = (0, 0)

    @property
    def cells(self) -> tuple[int, int]:
        """The upscaled size in whole 8-pixel cells, in pixels."""
        return (self.upscale[0] // 8 * 8, self.upscale[1] // 8 * 8)

    @property
    def size(self) -> tuple[int, int]:
        return (self.cells[0] - self.crop[0], self.cells[1] - self.crop[1])


def target(size: tuple[int, int], scale: float | None, resize: tuple[int, int] | None) -> Target:
    """A1111's `calculate_target_resolution`: int(w * scale) x int(h * scale); or a resize to
    (w, h), one side 0 to keep the aspect; both sides of another aspect: upscaled to cover, then
    the latents cropped to the centre."""
    w, h = size
    if resize is None or resize == (0, 0):
        factor = 1.0 if scale is None else scale
        return Target((int(w * factor), int(h * factor)))
    rx, ry = resize
    if ry == 0:
        return Target((rx, rx * h // w))
    if rx == 0:
        return Target((ry * w // h, ry))
    up = (rx, rx * h // w) if w / h < rx / ry else (ry * w // h, ry)
    return Target(up, ((up[0] - rx) // 8 * 8, (up[1] - ry) // 8 * 8))


def old_first_pass(width: int, height: int) -> tuple[int, int]:
    """The first pass of A1111's first hires fix (before 1.0, `First pass size: 0x0`): about
    512x512 pixels of the final aspect, each side rounded up to a multiple of 64."""
    scale = (512 * 512 / (width * height)) ** 0.5
    return math.ceil(scale * width / 64) * 64, math.ceil(scale * height / 64) * 64


# Images with a side above this many pixels are decoded by the VAE in tiles of VAE_TILE pixels
# (overlapping, blended), whatever the device: a 2048x2048 second pass then decodes in the memory
# of a 1024x1024 one. It depends on the size alone, so a picture never depends on the GPU it ran
# on; tiling changes pixels a little (the VAE's attention sees one tile), so the manifest records it.
VAE_TILE_ABOVE = 1536
VAE_TILE = 1024


def auto_vae_tile(size: tuple[int, int]) -> int | None:
    """The VAE tile (pixels) an image of `size` (w, h) is decoded in, or None for whole."""
    return VAE_TILE if max(size) > VAE_TILE_ABOVE else None
