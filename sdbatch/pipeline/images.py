"""Init images and masks as tensors, and decoded tensors back to Pillow images."""

import numpy as np
import torch
from PIL import Image

from ..images import fit, to_rgb


def image_tensor(image: Image.Image, width: int, height: int, resize: str | None = None) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1], brought to the size by the recipe's `resize` mode (sdbatch.images.fit);
    the caller's image is never modified."""
    rgb = fit(to_rgb(image), width, height, "init_image", resize)
    array = np.asarray(rgb, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2 - 1


def mask_tensor(mask: Image.Image, width: int, height: int, resize: str | None = None) -> torch.Tensor:
    """(1, 1, H, W) of 0/1: white (>= 50% grey) is repainted, as in diffusers and A1111. Resized as
    the init image is (A1111 resizes its mask with the same mode), so the two stay aligned."""
    grey = fit(to_rgb(mask).convert("L"), width, height, "mask", resize)
    return (torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0) >= 0.5).float()[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> 8-bit RGB, rounding as diffusers does."""
    array = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, "RGB") for a in array]
