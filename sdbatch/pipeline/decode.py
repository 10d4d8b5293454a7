"""Latents to pixels: tiled decoding for large sizes, and fp32 for a moment when fp16 overflows."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def tiled_decode(decode: Callable, z: torch.Tensor, tile: int, overlap: int, factor: int) -> torch.Tensor:
    """Decode (B, C, h, w) latents tile by tile: tiles of `tile` cells start every tile - overlap
    cells, and each is blended into its upper and left neighbours over the overlap (in pixels), then
    cut to its stride. diffusers' AutoencoderKL.tiled_decode scheme, without its sliver tiles."""
    stride, blend = tile - overlap, overlap * factor
    # a tile starts only where the one before it stops short of the edge: no sliver tiles
    starts_y = range(0, max(1, z.shape[-2] - overlap), stride)
    starts_x = range(0, max(1, z.shape[-1] - overlap), stride)
    rows = [[decode(z[:, :, i : i + tile, j : j + tile]) for j in starts_x] for i in starts_y]
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, part in enumerate(row):
            if i > 0:
                above = rows[i - 1][j]
                n = min(blend, above.shape[2], part.shape[2])
                w = torch.linspace(0, 1, n + 1, device=part.device)[:n].view(1, 1, n, 1)
                part[:, :, :n] = above[:, :, -n:] * (1 - w) + part[:, :, :n] * w
            if j > 0:
                left = row[j - 1]
                n = min(blend, left.shape[3], part.shape[3])
                w = torch.linspace(0, 1, n + 1, device=part.device)[:n].view(1, 1, 1, n)
                part[:, :, :, :n] = left[:, :, :, -n:] * (1 - w) + part[:, :, :, :n] * w
            height = stride * factor if i < len(rows) - 1 else part.shape[2]  # the last tile keeps it all
            width = stride * factor if j < len(row) - 1 else part.shape[3]
            parts.append(part[:, :, :height, :width])
        out_rows.append(torch.cat(parts, dim=3))
    return torch.cat(out_rows, dim=2)


@contextmanager
def upcast(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run a module in float32 for a moment, then give it back its dtype (exact for fp16/bf16 weights)."""
    dtype = next(module.parameters()).dtype
    try:
        yield module.float()
    finally:
        module.to(dtype)
