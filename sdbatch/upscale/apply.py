"""Running an upscaler: on a tensor in tiles (memory bounded by the tile, no seams), and on an image
the way A1111's hires fix does (run the model up to three times, then resize with Lanczos).

Tiling. A tile's border pixels are wrong: its convs see zero padding where the image goes on. So
adjacent tiles share at least `overlap` input pixels; in each shared strip the quarter next to a
tile's cut edge gets no weight, and the middle half cross-fades linearly from one tile to the next.
The weights are normalised, so a network that looks at no neighbours gives exactly the untiled result,
and one that looks at most overlap/4 pixels away does too (to float precision); a real ESRGAN looks
further, and the cross-fade hides what differs. (A1111 blends its uint8 tiles over the whole overlap,
including the pixels next to the cut; our tiles are not pixel-identical to its.)
"""

import itertools

import numpy as np
import torch
from PIL import Image
from torch import nn

from .esrgan import pad_to_multiple

MAX_RUNS = 3  # A1111's Upscaler.upscale: at most three passes of the model before the final resize
LANCZOS = Image.Resampling.LANCZOS


def upscale_tensor(net: nn.Module, x: torch.Tensor, tile: int | None = 192, overlap: int = 8) -> torch.Tensor:
    """(N, C, H, W) in 0..1 -> (N, C', H * scale, W * scale) float32 on x's device. `tile` bounds the
    side of what the network sees at once, and so its memory (None or 0, as in A1111's settings: the
    whole image). `net` needs `.scale`, and RRDBNet's `.unshuffle`: tiles then start and end on
    multiples of it, so that no tile is padded inside the image."""
    scale, factor = net.scale, getattr(net, "unshuffle", 1)
    param = next(net.parameters(), x)
    _, _, height, width = x.shape
    with torch.inference_mode():
        if not tile or (height <= tile and width <= tile):
            return net(x.to(param)).float().to(x.device)
        window = tile // factor * factor
        if overlap < 0 or window - overlap < factor:
            raise ValueError(f"tile {tile} must exceed the overlap ({overlap}) by at least {factor}")
        padded = pad_to_multiple(x, factor)
        rows = _windows(padded.shape[-2], window, overlap, factor, scale)
        cols = _windows(padded.shape[-1], window, overlap, factor, scale)
        out: torch.Tensor | None = None
        for top, tall, weight_y in rows:
            for left, wide, weight_x in cols:
                piece = net(padded[..., top : top + tall, left : left + wide].to(param)).float()
                if out is None:
                    out = piece.new_zeros(*piece.shape[:2], padded.shape[-2] * scale, padded.shape[-1] * scale)
                weight = weight_y.to(piece)[:, None] * weight_x.to(piece)[None, :]
                out[..., top * scale : (top + tall) * scale, left * scale : (left + wide) * scale] += piece * weight
        assert out is not None
        out /= _coverage(rows, out.shape[-2]).to(out)[:, None] * _coverage(cols, out.shape[-1]).to(out)[None, :]
        return out[..., : height * scale, : width * scale].to(x.device)


def _windows(size: int, window: int, overlap: int, factor: int, scale: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, length, output weights) of the tiles along one side: as few as keep every shared strip
    at least `overlap` wide, spread evenly, starting on multiples of `factor`."""
    if size <= window:
        return [(0, size, torch.ones(size * scale))]
    count = -(-(size - overlap) // (window - overlap))
    while True:
        starts = [i * (size - window) // (count - 1) // factor * factor for i in range(count)]
        if all(a + window - b >= overlap for a, b in itertools.pairwise(starts)):
            break
        count += 1
    edge = (torch.arange(window * scale) + 0.5) / scale  # distance from the tile's start, in input pixels
    tiles = []
    for i, start in enumerate(starts):
        weight = torch.ones(window * scale)
        if i > 0:  # cut at the start: the neighbour before it covers this edge
            weight = torch.minimum(weight, _ramp(edge, overlap))
        if i < count - 1:
            weight = torch.minimum(weight, _ramp(window - edge, overlap))
        tiles.append((start, window, weight))
    return tiles


def _ramp(distance: torch.Tensor, overlap: int) -> torch.Tensor:
    """0 within overlap/4 of a cut edge, rising linearly to 1 at 3/4 of the overlap."""
    if overlap == 0:
        return torch.ones_like(distance)
    return ((distance - overlap / 4) / (overlap / 2)).clamp(0.0, 1.0)


def _coverage(tiles: list[tuple[int, int, torch.Tensor]], size: int) -> torch.Tensor:
    """The summed weights along one side of the output (never 0: every pixel is some tile's inside)."""
    total = torch.zeros(size)
    for start, length, weight in tiles:
        scale = weight.numel() // length
        total[start * scale : (start + length) * scale] += weight
    return total


def upscale_image(
    net: nn.Module,
    image: Image.Image,
    size: tuple[int, int],
    tile: int | None = 192,
    overlap: int = 8,
    bgr: bool = True,
) -> Image.Image:
    """`image` brought to `size` (width, height) as A1111's hires fix does with an upscaler model
    (images.resize_image -> Upscaler.upscale): when the target is larger, run the model until the
    image is at least the target rounded down to multiples of 8, at most three times (once for a 1x
    model: its size does not change), Lanczos to that, then Lanczos to the exact size.

    `bgr`: A1111 hands the model the channels in BGR order (pil_image_to_torch_bgr), although ESRGAN
    and Real-ESRGAN were trained on RGB; True reproduces A1111's pixels, False gives the trained order."""
    width, height = size
    image = image.convert("RGB")
    factor = max(width / image.width, height / image.height)
    if factor > 1.0:
        dest = (max(1, int((image.width * factor) // 8 * 8)), max(1, int((image.height * factor) // 8 * 8)))
        for _ in range(MAX_RUNS):
            before = image.size
            image = _run(net, image, tile, overlap, bgr)
            if image.size == before or (image.width >= dest[0] and image.height >= dest[1]):
                break
        if image.size != dest:
            image = image.resize(dest, resample=LANCZOS)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


def _run(net: nn.Module, image: Image.Image, tile: int | None, overlap: int, bgr: bool) -> Image.Image:
    """One pass of the model over an 8-bit RGB image, rounded back to 8 bits as A1111 does."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    if bgr:
        x = x.flip(1)
    y = upscale_tensor(net, x, tile, overlap)[0]
    if bgr:
        y = y.flip(0)
    pixels = (y.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(1, 2, 0)
    return Image.fromarray(pixels.cpu().numpy(), "RGB")
