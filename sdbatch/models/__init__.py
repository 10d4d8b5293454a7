"""The three SD v1 networks under one module whose state-dict keys are the LDM checkpoint's keys."""

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .clip import CLIPConfig, CLIPTextEncoder
from .common import namespace
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

__all__ = [
    "CONFIGS",
    "CLIPConfig",
    "SDConfig",
    "StableDiffusion",
    "UNetConfig",
    "VAEConfig",
    "build_model",
    "get_config",
]


@dataclass(frozen=True)
class SDConfig:
    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    sample_size: int = 512  # the image side it was trained at: a job's size when none is given

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SDConfig":
        """Inverse of `to_dict` (JSON turns tuples into lists); raises TypeError/KeyError on bad data."""

        def part(kind: type, values: dict):
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        return cls(
            name=str(data["name"]),
            unet=part(UNetConfig, data["unet"]),
            vae=part(VAEConfig, data["vae"]),
            clip=part(CLIPConfig, data["clip"]),
            sample_size=int(data.get("sample_size") or getattr(CONFIGS.get(str(data["name"])), "sample_size", 512)),
        )


_SD15 = SDConfig("sd15")
# Small enough to run a forward pass in milliseconds on a CPU; same structure, so every code path
# (attention at some levels only, skip convs, up/downsampling) is exercised.
_TINY = SDConfig(
    "tiny",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        attention_levels=(True, False),
        num_heads=2,
        context_dim=32,
        norm_groups=8,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, norm_groups=8),  # f=8 like SD
    clip=CLIPConfig(width=32, layers=2, heads=2, mlp=64),
    sample_size=64,
)

# The shipped demo model (sdbatch.demo.train): 32x32 images, f=4 latents, a 3-layer text encoder with
# 16 positions over the demo vocabulary (< 640 tokens); sized to train in well under an hour on a
# 2-core CPU. Its real scale_factor is measured in training and stored in the weights file's header.
_DEMO = SDConfig(
    "demo",
    unet=UNetConfig(
        model_channels=48,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(False, True, True),
        num_heads=4,
        context_dim=128,
        norm_groups=16,
    ),
    vae=VAEConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, scale_factor=1.0),
    clip=CLIPConfig(vocab_size=640, width=128, max_positions=16, layers=3, heads=4, mlp=512),
    sample_size=32,
)

CONFIGS: dict[str, SDConfig] = {
    "sd15": _SD15,
    "sd15-inpainting": replace(_SD15, name="sd15-inpainting", unet=replace(_SD15.unet, in_channels=9)),
    "demo": _DEMO,
    "tiny": _TINY,
    "tiny-inpainting": replace(_TINY, name="tiny-inpainting", unet=replace(_TINY.unet, in_channels=9)),
}


def get_config(config: "str | SDConfig") -> SDConfig:
    if isinstance(config, SDConfig):
        return config
    try:
        return CONFIGS[config]
    except KeyError:
        raise ValueError(f"unknown model config {config!r}; known: {', '.join(CONFIGS)}") from None


class StableDiffusion(nn.Module):
    """UNet + VAE + CLIP text encoder. `state_dict()` keys equal an original SD1.5 single-file
    checkpoint's, so loading one is a plain `load_state_dict` (see sdbatch.checkpoint)."""

    def __init__(self, cfg: SDConfig):
        super().__init__()
        self.config = cfg
        self.model = namespace(diffusion_model=UNet(cfg.unet))
        self.first_stage_model = AutoencoderKL(cfg.vae)
        self.cond_stage_model = CLIPTextEncoder(cfg.clip)

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> CLIPTextEncoder:
        return self.cond_stage_model


def build_model(
    config: "str | SDConfig" = "sd15", device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusion:
    """A randomly initialised model; on `device="meta"` it has shapes only and costs no memory."""
    cfg = get_config(config)
    with torch.device(device):
        model = StableDiffusion(cfg)
    return model.to(dtype=dtype)
