"""Small pieces shared by the three networks."""

import torch
import torch.nn.functional as F
from torch import nn


def namespace(**modules: nn.Module) -> nn.Module:
    """An empty module holding children, so that state-dict keys carry the checkpoint's path segments
    (`model.diffusion_model`, `cond_stage_model.transformer.text_model`) without a class per level."""
    holder = nn.Module()
    for name, module in modules.items():
        holder.add_module(name, module)
    return holder


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv; the same layer (and key, `.conv`) in the UNet and the VAE."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
