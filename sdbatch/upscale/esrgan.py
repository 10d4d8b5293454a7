"""ESRGAN's RRDBNet (Wang et al. 2018), the network behind ESRGAN 4x, 4x-UltraSharp, NMKD Siax and
Real-ESRGAN x4plus / x4plus_anime_6B / x2plus, with module names of Real-ESRGAN's checkpoints.

    conv_first -> body (nb x RRDB) -> conv_body, added to its input (the long skip)
    -> per x2 stage: nearest 2x, conv_up<i>, LeakyReLU(0.2) -> conv_hr, LeakyReLU -> conv_last

An RRDB is three residual dense blocks in a chain, its output scaled by 0.2 and added to its input; a
dense block is five 3x3 convs, each reading the block input concatenated with every earlier conv's
output (growing by `gc` channels), the last scaled by 0.2 and added to the block input. Real-ESRGAN's
x2 and x1 models run the same 4x network on a pixel-unshuffled image (each 2x2 / 4x4 block folded into
channels), so they read 12 / 48 channels; the unshuffle needs sides divisible by its factor, so the
image is padded by reflection at the bottom and right and the output cropped, as Real-ESRGAN does.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.read import CheckpointError, first_line
from .files import UpscalerError, UpscalerInfo, read_upscaler


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResidualDenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = conv3x3(nf, gc)
        self.conv2 = conv3x3(nf + gc, gc)
        self.conv3 = conv3x3(nf + 2 * gc, gc)
        self.conv4 = conv3x3(nf + 3 * gc, gc)
        self.conv5 = conv3x3(nf + 4 * gc, nf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            features.append(lrelu(conv(torch.cat(features, dim=1))))
        return x + 0.2 * self.conv5(torch.cat(features, dim=1))


class RRDB(nn.Module):
    """Residual in residual dense block."""

    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(nf, gc)
        self.rdb2 = ResidualDenseBlock(nf, gc)
        self.rdb3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """`scale` is the output side over the input side; `unshuffle` (1, 2 or 4) folds the input first,
    so the network has log2(scale * unshuffle) upsampling stages and reads 3 * unshuffle² channels."""

    def __init__(
        self, *, nf: int = 64, nb: int = 23, gc: int = 32, scale: int = 4, unshuffle: int = 1, out_nc: int = 3
    ) -> None:
        super().__init__()
        stages = (scale * unshuffle).bit_length() - 1
        if scale < 1 or unshuffle not in (1, 2, 4) or 2**stages != scale * unshuffle:
            raise ValueError(f"no RRDBNet has scale {scale} with a pixel-unshuffle by {unshuffle}")
        self.scale, self.unshuffle = scale, unshuffle
        self.conv_first = conv3x3(3 * unshuffle**2, nf)
        self.body = nn.Sequential(*(RRDB(nf, gc) for _ in range(nb)))
        self.conv_body = conv3x3(nf, nf)
        for i in range(1, stages + 1):
            self.add_module(f"conv_up{i}", conv3x3(nf, nf))  # named as Real-ESRGAN's keys, not conv_up.0
        self.ups = [getattr(self, f"conv_up{i}") for i in range(1, stages + 1)]
        self.conv_hr = conv3x3(nf, nf)
        self.conv_last = conv3x3(nf, out_nc)

    @classmethod
    def from_info(cls, info: UpscalerInfo) -> "RRDBNet":
        return cls(nf=info.nf, nb=info.nb, gc=info.gc, scale=info.scale, unshuffle=info.unshuffle, out_nc=info.out_nc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in 0..1 -> (N, 3, H * scale, W * scale), any H and W."""
        h, w = x.shape[-2:]
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(pad_to_multiple(x, self.unshuffle), self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.ups:
            feat = lrelu(conv(F.interpolate(feat, scale_factor=2.0, mode="nearest")))
        out = self.conv_last(lrelu(self.conv_hr(feat)))
        return out[..., : h * self.scale, : w * self.scale]


def pad_to_multiple(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Pad the bottom and right by reflection to sides divisible by `factor` (Real-ESRGAN's mod pad);
    a side too short to reflect (1 pixel) is repeated instead."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % factor, -w % factor
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def load_upscaler(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> RRDBNet:
    """An ESRGAN upscaler file in any of its layouts as our RRDBNet, in eval mode without gradients.
    Every tensor is checked to be finite first, so a damaged file is refused naming its layer rather
    than giving black or NaN images."""
    info = read_upscaler(path)
    state = {}
    for key, ref in info.tensors.items():
        try:
            tensor = ref.load()
        except CheckpointError as e:
            raise UpscalerError(str(e)) from None
        except Exception as e:  # safetensors' own errors: the file changed since its header was read
            raise UpscalerError(f"{info.path}: cannot read {info.names[key]} ({first_line(e)})") from None
        if not torch.isfinite(tensor).all():
            raise UpscalerError(f"{info.path}: {info.names[key]} holds NaN or infinite values")
        state[key] = tensor
    net = RRDBNet.from_info(info)
    net.load_state_dict(state, strict=True)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)
