"""The SD v1 denoising UNet (`model.diffusion_model.*`): predicts the noise in a latent at step t."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import BasicTransformerBlock
from .common import Upsample
from .configs import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoids with cos first, as the LDM checkpoints were trained (diffusers: flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, cin: int, cout: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cfg.time_embed_dim, cout))
        # index 2 was dropout in LDM; Identity keeps the conv at `out_layers.3`
        self.out_layers = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, cout), nn.SiLU(), nn.Identity(), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class SpatialTransformer(nn.Module):
    """Image features attend to themselves and to the prompt, as tokens (B, H*W, C)."""

    def __init__(self, cfg: UNetConfig, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, cfg.num_heads, cfg.context_dim)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # permute+reshape gives contiguous tokens: a transposed view would make every LayerNorm and
        # Linear below copy its input first
        y = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous())


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class SkipSizedUpsample(Upsample):
    """The shared Upsample (same `.conv` key), but to the size of the skip connection it meets.
    Going down, a stride-2 conv takes an odd side n to (n + 1) / 2, so 2x going up would be one cell
    too many: diffusers passes `upsample_size` for this. Nearest to exactly 2x equals scale_factor=2,
    so sizes that divide evenly get the same numbers as before."""

    def forward(self, x: torch.Tensor, size: "tuple[int, int] | None" = None) -> torch.Tensor:
        if size is None:
            return super().forward(x)
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepBlock(nn.Sequential):
    """A numbered stage (`input_blocks.4`): each layer takes what it needs of (x, emb, context, and
    for an output block's Upsample the size of the skip connection it will be concatenated with)."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, up_size: "tuple[int, int] | None" = None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, SkipSizedUpsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc = cfg.model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(mc, cfg.time_embed_dim), nn.SiLU(), nn.Linear(cfg.time_embed_dim, cfg.time_embed_dim)
        )

        self.input_blocks = nn.ModuleList([TimestepBlock(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips = [mc]  # channels of each skip connection, consumed in reverse by the output blocks
        ch = mc
        last = len(cfg.channel_mult) - 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(cfg, ch, mult * mc)]
                ch = mult * mc
                if cfg.attention_levels[level]:
                    layers.append(SpatialTransformer(cfg, ch))
                self.input_blocks.append(TimestepBlock(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(TimestepBlock(Downsample(ch)))
                skips.append(ch)

        self.middle_block = TimestepBlock(ResBlock(cfg, ch, ch), SpatialTransformer(cfg, ch), ResBlock(cfg, ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(cfg, ch + skips.pop(), mult * mc)]
                ch = mult * mc
                if cfg.attention_levels[level]:
                    layers.append(SpatialTransformer(cfg, ch))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(SkipSizedUpsample(ch))
                self.output_blocks.append(TimestepBlock(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, h, w) latents; t: (B,) timesteps; context: (B, tokens, context_dim)."""
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        hs = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            hs.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, hs.pop()], dim=1)
            x = block(x, emb, context, tuple(hs[-1].shape[-2:]) if hs else None)  # the next skip's size
        return self.out(x)
